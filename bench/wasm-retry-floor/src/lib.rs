//! The host calls any filter needs that retries idempotent requests by request headers and
//! learns from the answers, and nothing else: read the method, write `x-envoy-retry-on` and
//! `x-envoy-max-retries`, read the status and the attempt count once the request is done.
//! What it costs over `wasm-noop` is what learning from every answer costs; churn-guard's calm
//! path, which reads no answer and samples instead, is meant to cost less.

#[cfg(target_os = "wasi")]
mod filter {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, MapType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;
    impl Context for Root {}
    impl RootContext for Root {
        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Request))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Request;
    impl Context for Request {}
    impl HttpContext for Request {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            let method = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":method").ok().flatten();
            let retry_on = match method.as_deref() {
                Some("GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE") => "connect-failure,refused-stream,reset",
                _ => "connect-failure,refused-stream,reset-before-request",
            };
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-envoy-retry-on", Some(retry_on));
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-envoy-max-retries", Some("2"));
            Action::Continue
        }

        fn on_log(&mut self) {
            let _ = hostcalls::get_property(vec!["response", "code"]);
            let _ = hostcalls::get_property(vec!["upstream", "request_attempt_count"]);
        }
    }
}

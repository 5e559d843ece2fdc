//! Plugin configuration: JSON, camelCase, every field optional.
//!
//! `{}` (or an empty configuration) is a complete, useful configuration: safe retries with a
//! budget, endpoint health learnt and reported (ejections act on routing only through
//! steering or the fallback), no steering, no fallback.
//! Every error names the offending field, because Envoy only shows a log line.

use serde::Deserialize;
use std::fmt;

/// A configuration error, always naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid churn-guard configuration: field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub ejection: EjectionConfig,
    pub retry: RetryConfig,
    /// Steer through Envoy's `override_host` policy (Envoy Gateway `loadBalancer.endpointOverride`).
    pub endpoint_override: Option<EndpointOverrideConfig>,
    /// Send requests to a Service-routed backend while a cluster's endpoint set looks stale.
    pub fallback: Option<FallbackConfig>,
    /// Add an `x-churn-guard` response header describing the decision (exposes endpoint addresses;
    /// meant for debugging and tests).
    pub debug_header: bool,
    /// Keep the override and fallback headers that arrive with a request, and leave a request
    /// that carries its own retry headers to them. Off by default: they steer routing and
    /// retries, and any client Envoy keeps `x-envoy-*` headers from could otherwise pin a pod,
    /// force Service routing or retry past the budget. Turn it on only where a trusted hop (a
    /// mesh) sets them on purpose.
    pub trust_client_headers: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct EjectionConfig {
    /// Consecutive failures where nothing reached the endpoint (connect failure, refused stream)
    /// before it is ejected. These are unambiguous: the endpoint is not there.
    pub consecutive_local_origin_failures: u32,
    /// Consecutive gateway errors (resets, 502/503/504, upstream timeouts) before ejection.
    pub consecutive_gateway_errors: u32,
    /// Consecutive 5xx of any kind before ejection; 0 disables this rule.
    pub consecutive_5xx: u32,
    /// First ejection lasts this long; each re-ejection doubles it.
    pub base_ejection_ms: u64,
    /// Upper bound on one ejection.
    pub max_ejection_ms: u64,
    /// Bound on tracked endpoints per cluster; least recently seen ones are forgotten first.
    pub max_endpoints_per_cluster: u32,
    /// An endpoint not seen for this long is forgotten (pods that were scaled away).
    pub endpoint_ttl_ms: u64,
}

impl Default for EjectionConfig {
    fn default() -> Self {
        Self {
            consecutive_local_origin_failures: 1,
            consecutive_gateway_errors: 3,
            consecutive_5xx: 0,
            base_ejection_ms: 10_000,
            max_ejection_ms: 300_000,
            max_endpoints_per_cluster: 1024,
            endpoint_ttl_ms: 600_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    pub enabled: bool,
    /// `x-envoy-max-retries` for one request. Without steering Envoy picks each retry's endpoint
    /// at random, so with half the endpoints stale it takes about ten retries to keep failures
    /// under 0.1%. Retries cost little when nothing reached the endpoint; the budget, not this
    /// number, bounds the load a real outage adds.
    pub max_retries: u32,
    /// Status codes from the upstream that are retried for idempotent requests.
    pub retriable_status_codes: Vec<u16>,
    /// `x-envoy-upstream-rq-per-try-timeout-ms` to add; unset leaves Envoy's route timeout alone.
    pub per_try_timeout_ms: Option<u64>,
    pub budget: RetryBudgetConfig,
    /// gRPC statuses retried for gRPC requests (`x-envoy-retry-grpc-on`). The default is what
    /// Envoy Gateway's BackendTrafficPolicy retries by default: `cancelled` and `unavailable`.
    /// Empty: gRPC calls are retried only when nothing reached the endpoint.
    pub grpc_retry_on: Vec<String>,
    /// The gRPC services behind this route are idempotent: a call reset after it was sent is
    /// retried too, as GETs are. Off by default: a reset call may have run.
    pub grpc_idempotent: bool,
    /// `x-envoy-retry-on` for idempotent requests. 502, 503 and 504 together are Envoy's
    /// `gateway-error`, which needs no `x-envoy-retriable-status-codes` header: one header
    /// write fewer per request, and the costliest of them.
    #[serde(skip)]
    pub idempotent_retry_on: String,
    /// The retriable codes `gateway-error` does not cover, as the
    /// `x-envoy-retriable-status-codes` value; joined once at configure time.
    #[serde(skip)]
    pub status_codes_header: Option<String>,
    /// `grpc_retry_on` as the `x-envoy-retry-grpc-on` value.
    #[serde(skip)]
    pub grpc_retry_on_header: Option<String>,
}

/// The gRPC retry conditions Envoy's router knows.
pub const GRPC_RETRY_CONDITIONS: [&str; 5] =
    ["cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"];

/// The statuses Envoy's `gateway-error` retry condition covers.
const GATEWAY_ERRORS: [u16; 3] = [502, 503, 504];

impl Default for RetryConfig {
    fn default() -> Self {
        let mut retry = Self {
            enabled: true,
            max_retries: 10,
            retriable_status_codes: GATEWAY_ERRORS.to_vec(),
            per_try_timeout_ms: None,
            budget: RetryBudgetConfig::default(),
            grpc_retry_on: vec!["cancelled".into(), "unavailable".into()],
            grpc_idempotent: false,
            idempotent_retry_on: String::new(),
            status_codes_header: None,
            grpc_retry_on_header: None,
        };
        retry.derive_headers();
        retry
    }
}

impl RetryConfig {
    /// The header values the configuration implies, computed once rather than per request.
    fn derive_headers(&mut self) {
        let codes = &self.retriable_status_codes;
        let gateway_errors = GATEWAY_ERRORS.iter().all(|c| codes.contains(c));
        let rest: Vec<String> =
            codes.iter().filter(|c| !(gateway_errors && GATEWAY_ERRORS.contains(c))).map(u16::to_string).collect();
        let mut retry_on = String::from(crate::decision::RETRY_ON_IDEMPOTENT_NO_CODES);
        if gateway_errors {
            retry_on.push_str(",gateway-error");
        }
        if !rest.is_empty() {
            retry_on.push_str(",retriable-status-codes");
        }
        self.idempotent_retry_on = retry_on;
        self.status_codes_header = (!rest.is_empty()).then(|| rest.join(","));
        self.grpc_retry_on_header = (!self.grpc_retry_on.is_empty()).then(|| self.grpc_retry_on.join(","));
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries allowed per original request, averaged over the window. 1.0 bounds the load a
    /// full outage adds to twice the offered load.
    pub ratio: f64,
    /// Retries always allowed per second, so low-traffic routes can still retry.
    pub min_retries_per_second: u32,
    /// How long deposits stay valid.
    pub window_seconds: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self { ratio: 1.0, min_retries_per_second: 10, window_seconds: 10 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointOverrideConfig {
    /// Must equal the header in the BackendTrafficPolicy's `loadBalancer.endpointOverride.extractFrom`.
    pub header: String,
    /// Share of steered-mode requests left to Envoy's load balancer, so new endpoints are found.
    pub explore_ratio: f64,
    /// How long a cluster stays in steered mode after a request needed a retry that could not be
    /// attributed to an endpoint.
    pub suspect_ms: u64,
    /// Endpoints back from an ejection are probed with `GET probePath`, pinned to the endpoint
    /// through the override header, before real requests rely on them again. Any status below
    /// 500 counts as an answer; a failed probe ejects the endpoint again, for twice as long.
    pub probe_path: String,
    pub probe_timeout_ms: u64,
    /// A request still unanswered after this long (and after four times the cluster's recent
    /// p99) makes the plugin probe the cluster's endpoints, waiting as long for each: those that
    /// do not answer are doubted, steered last and probed again, long before a connect or
    /// per-try timeout would show a pod that vanished without a reset. 0 turns this off.
    pub stall_after_ms: u64,
    /// While sweeps are finding the cluster's endpoints silent, requests whose retries replay a
    /// reset get a per-try timeout of this many stall thresholds (never longer than
    /// `retry.perTryTimeoutMs`), so an attempt stuck at a vanished pod moves on. A request
    /// slower than that is cut and retried meanwhile: raise it for services with a heavy tail.
    /// 0 turns it off.
    pub stalled_attempt_factor: u64,
}

impl Default for EndpointOverrideConfig {
    fn default() -> Self {
        Self {
            header: "x-gateway-destination-endpoint".into(),
            explore_ratio: 0.05,
            suspect_ms: 10_000,
            probe_path: "/".into(),
            probe_timeout_ms: 2_000,
            stall_after_ms: 100,
            stalled_attempt_factor: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackConfig {
    /// Header the fallback route rule matches on.
    pub header: String,
    pub value: String,
    /// Fall back while at least this share of a cluster's known endpoints is ejected.
    pub ejected_share: f64,
    /// Fall back after this many consecutive requests found no healthy upstream at all.
    pub consecutive_no_upstream: u32,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        Self {
            header: "x-churn-guard-fallback".into(),
            value: "true".into(),
            ejected_share: 0.5,
            consecutive_no_upstream: 3,
        }
    }
}

impl Config {
    /// Request headers that steer routing and that clients may not send: removed before the
    /// filter decides, unless `trustClientHeaders`.
    pub fn untrusted_headers(&self) -> impl Iterator<Item = &str> {
        let trusted = self.trust_client_headers;
        let override_header = self.endpoint_override.as_ref().map(|o| o.header.as_str());
        let fallback_header = self.fallback.as_ref().map(|f| f.header.as_str());
        override_header.into_iter().chain(fallback_header).filter(move |_| !trusted)
    }

    /// Parses and validates a plugin configuration. Empty input means defaults.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        // serde accepts a JSON array for a struct; a configuration is an object.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ConfigError { field: ".".into(), message: "must be a JSON object".into() });
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let config: Config = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| ConfigError { field: e.path().to_string(), message: e.into_inner().to_string() })?;
        de.end().map_err(|e| ConfigError { field: ".".into(), message: e.to_string() })?;
        config.validate()?;
        let mut config = config;
        config.retry.derive_headers();
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let e = &self.ejection;
        check(e.base_ejection_ms >= 1, "ejection.baseEjectionMs", "must be at least 1")?;
        check(
            e.max_ejection_ms >= e.base_ejection_ms,
            "ejection.maxEjectionMs",
            "must be at least ejection.baseEjectionMs",
        )?;
        check(
            (1..=65_536).contains(&e.max_endpoints_per_cluster),
            "ejection.maxEndpointsPerCluster",
            "must be between 1 and 65536",
        )?;
        check(e.endpoint_ttl_ms >= 1_000, "ejection.endpointTtlMs", "must be at least 1000")?;
        check(
            e.consecutive_local_origin_failures <= 1_000,
            "ejection.consecutiveLocalOriginFailures",
            "must be at most 1000 (0 disables)",
        )?;
        check(
            e.consecutive_gateway_errors <= 1_000,
            "ejection.consecutiveGatewayErrors",
            "must be at most 1000 (0 disables)",
        )?;
        check(e.consecutive_5xx <= 1_000, "ejection.consecutive5xx", "must be at most 1000 (0 disables)")?;

        let r = &self.retry;
        check(r.max_retries <= 25, "retry.maxRetries", "must be at most 25")?;
        for code in &r.retriable_status_codes {
            check((500..=599).contains(code), "retry.retriableStatusCodes", "codes must be 5xx")?;
        }
        for condition in &r.grpc_retry_on {
            check(
                GRPC_RETRY_CONDITIONS.contains(&condition.as_str()),
                "retry.grpcRetryOn",
                "conditions must be among cancelled, deadline-exceeded, internal, resource-exhausted, unavailable",
            )?;
        }
        if let Some(t) = r.per_try_timeout_ms {
            check(t >= 1, "retry.perTryTimeoutMs", "must be at least 1")?;
        }
        let b = &r.budget;
        check(
            b.ratio.is_finite() && (0.0..=10.0).contains(&b.ratio),
            "retry.budget.ratio",
            "must be between 0 and 10",
        )?;
        check((1..=3_600).contains(&b.window_seconds), "retry.budget.windowSeconds", "must be between 1 and 3600")?;

        if let Some(o) = &self.endpoint_override {
            check(is_header_name(&o.header), "endpointOverride.header", "must be a lower-case HTTP header name")?;
            check((0.0..=1.0).contains(&o.explore_ratio), "endpointOverride.exploreRatio", "must be between 0 and 1")?;
            check(
                o.stall_after_ms == 0 || (10..=600_000).contains(&o.stall_after_ms),
                "endpointOverride.stallAfterMs",
                "must be 0 (off) or between 10 and 600000",
            )?;
            check(
                o.stalled_attempt_factor == 0 || (2..=1_000).contains(&o.stalled_attempt_factor),
                "endpointOverride.stalledAttemptFactor",
                "must be 0 (off) or between 2 and 1000",
            )?;
        }
        if let Some(f) = &self.fallback {
            check(is_header_name(&f.header), "fallback.header", "must be a lower-case HTTP header name")?;
            check(
                !f.value.is_empty() && f.value.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "fallback.value",
                "must be non-empty printable ASCII",
            )?;
            check(
                f.ejected_share > 0.0 && f.ejected_share <= 1.0,
                "fallback.ejectedShare",
                "must be greater than 0 and at most 1",
            )?;
        }
        if let (Some(o), Some(f)) = (&self.endpoint_override, &self.fallback) {
            check(o.header != f.header, "fallback.header", "must differ from endpointOverride.header")?;
        }
        Ok(())
    }
}

fn check(ok: bool, field: &str, message: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError { field: field.into(), message: message.into() })
    }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(':')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn err(json: &str) -> ConfigError {
        match Config::parse(json.as_bytes()) {
            Err(e) => e,
            Ok(c) => unreachable!("{json} should be rejected, parsed as {c:?}"),
        }
    }

    #[test]
    fn empty_and_braces_are_defaults() {
        assert_eq!(Config::parse(b"").ok(), Some(Config::default()));
        assert_eq!(Config::parse(b"  \n").ok(), Some(Config::default()));
        assert_eq!(Config::parse(b"{}").ok(), Some(Config::default()));
    }

    #[test]
    fn steering_headers_from_clients_are_untrusted_unless_configured() {
        let c = Config::parse(br#"{"endpointOverride":{},"fallback":{"header":"x-fb"}}"#).unwrap_or_default();
        let headers: Vec<&str> = c.untrusted_headers().collect();
        assert_eq!(headers, vec!["x-gateway-destination-endpoint", "x-fb"]);
        let c = Config::parse(br#"{"endpointOverride":{},"trustClientHeaders":true}"#).unwrap_or_default();
        assert_eq!(c.untrusted_headers().count(), 0);
        assert_eq!(Config::default().untrusted_headers().count(), 0, "nothing configured, nothing to remove");
    }

    #[test]
    fn grpc_retry_conditions_default_to_envoy_gateways_and_are_checked() {
        assert_eq!(Config::default().retry.grpc_retry_on_header.as_deref(), Some("cancelled,unavailable"));
        let parsed = Config::parse(b"{}").unwrap_or_default();
        assert_eq!(parsed.retry.grpc_retry_on_header.as_deref(), Some("cancelled,unavailable"));
        let c = Config::parse(br#"{"retry":{"grpcRetryOn":["unavailable","resource-exhausted"]}}"#);
        assert_eq!(c.ok().and_then(|c| c.retry.grpc_retry_on_header), Some("unavailable,resource-exhausted".into()));
        let c = Config::parse(br#"{"retry":{"grpcRetryOn":[]}}"#);
        assert_eq!(c.ok().map(|c| c.retry.grpc_retry_on_header), Some(None));
        let e = err(r#"{"retry":{"grpcRetryOn":["unavailable","5xx"]}}"#);
        assert_eq!(e.field, "retry.grpcRetryOn");
    }

    #[test]
    fn gateway_errors_are_retried_without_a_status_codes_header() {
        let retry_on = |json: &str| {
            Config::parse(json.as_bytes()).map(|c| (c.retry.idempotent_retry_on, c.retry.status_codes_header)).ok()
        };
        let gateway_error = "connect-failure,refused-stream,reset,gateway-error";
        assert_eq!(retry_on("{}"), Some((gateway_error.into(), None)));
        assert_eq!(Config::default().retry.idempotent_retry_on, gateway_error);
        assert_eq!(
            retry_on(r#"{"retry":{"retriableStatusCodes":[504,500,503,502]}}"#),
            Some((format!("{gateway_error},retriable-status-codes"), Some("500".into())))
        );
        // Not all three: the codes as given, no more.
        assert_eq!(
            retry_on(r#"{"retry":{"retriableStatusCodes":[502,503]}}"#),
            Some(("connect-failure,refused-stream,reset,retriable-status-codes".into(), Some("502,503".into())))
        );
        assert_eq!(
            retry_on(r#"{"retry":{"retriableStatusCodes":[]}}"#),
            Some(("connect-failure,refused-stream,reset".into(), None))
        );
    }

    #[test]
    fn defaults_are_useful() {
        let c = Config::default();
        assert!(c.retry.enabled && c.retry.max_retries >= 2);
        assert_eq!(c.ejection.consecutive_local_origin_failures, 1);
        assert!(c.endpoint_override.is_none() && c.fallback.is_none());
    }

    #[test]
    fn nested_sections_fill_defaults() {
        let c = Config::parse(br#"{"endpointOverride":{},"fallback":{"ejectedShare":0.8}}"#);
        let c = c.ok().unwrap_or_default();
        assert_eq!(c.endpoint_override.map(|o| o.header), Some("x-gateway-destination-endpoint".into()));
        assert_eq!(c.fallback.map(|f| (f.header, f.ejected_share)), Some(("x-churn-guard-fallback".into(), 0.8)));
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = err(r#"{"retry":{"maxRetries":"three"}}"#);
        assert_eq!(e.field, "retry.maxRetries");
        assert!(e.to_string().contains("retry.maxRetries"), "{e}");
    }

    #[test]
    fn unknown_field_names_the_field() {
        assert_eq!(err(r#"{"ejection":{"baseEjection":5}}"#).field, "ejection.baseEjection");
        assert_eq!(err(r#"{"maxRetries":5}"#).field, "maxRetries");
    }

    #[test]
    fn out_of_range_names_the_field() {
        assert_eq!(err(r#"{"retry":{"maxRetries":100}}"#).field, "retry.maxRetries");
        assert_eq!(err(r#"{"fallback":{"ejectedShare":0}}"#).field, "fallback.ejectedShare");
        assert_eq!(
            err(r#"{"endpointOverride":{"stalledAttemptFactor":1}}"#).field,
            "endpointOverride.stalledAttemptFactor"
        );
        assert_eq!(err(r#"{"ejection":{"baseEjectionMs":5000,"maxEjectionMs":10}}"#).field, "ejection.maxEjectionMs");
        assert_eq!(err(r#"{"endpointOverride":{"header":"X-Upper"}}"#).field, "endpointOverride.header");
        assert_eq!(err(r#"{"retry":{"retriableStatusCodes":[404]}}"#).field, "retry.retriableStatusCodes");
        assert_eq!(err(r#"{"retry":{"budget":{"ratio":-1}}}"#).field, "retry.budget.ratio");
    }

    #[test]
    fn malformed_json_is_rejected() {
        assert!(Config::parse(b"{").is_err());
        assert!(Config::parse(b"{} {}").is_err());
        assert!(Config::parse(b"[]").is_err());
        assert!(Config::parse(b"\xff").is_err());
    }
}

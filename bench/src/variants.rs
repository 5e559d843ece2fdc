//! The configurations compared, each in the terms of what Envoy Gateway would generate.

use harness::gateway::{FallbackRoute, GatewaySpec};
use serde_json::{json, Value};

pub const OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";
pub const FALLBACK_HEADER: &str = "x-churn-guard-fallback";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// What Envoy Gateway generates by default: least request, no retries, no outlier detection.
    Plain,
    /// BackendTrafficPolicy `retry: {}` and `healthCheck.passive: {}` with Envoy Gateway's defaults.
    Builtin,
    /// The best Envoy-native tuning: retries on other hosts, one local-origin failure ejects,
    /// 100% may be ejected, panic mode off.
    BuiltinTuned,
    /// `BuiltinTuned` with the connect and per-try timeouts a user facing vanishing pods sets.
    BuiltinTunedTimeouts,
    /// churn-guard with `{}`.
    ChurnGuard,
    /// churn-guard steering through `endpointOverride`.
    ChurnGuardOverride,
    /// churn-guard steering, falling back to the Service path when the endpoint set looks stale.
    ChurnGuardFallback,
    /// A proxy-wasm filter that does nothing, loaded the same way: what any Wasm filter costs.
    WasmNoop,
    /// The no-op filter on the recipe's gateway (`override_host` balancing, a fallback route):
    /// what the recipe's Envoy configuration costs before churn-guard does anything.
    WasmNoopFallback,
    /// A filter that only retries by request headers and reads each answer's status and attempt
    /// count: what learning from every answer costs, which churn-guard's calm path does not do.
    WasmRetryFloor,
}

impl Variant {
    pub const ALL: [Variant; 6] = [
        Variant::Plain,
        Variant::Builtin,
        Variant::BuiltinTuned,
        Variant::ChurnGuard,
        Variant::ChurnGuardOverride,
        Variant::ChurnGuardFallback,
    ];

    /// Scenarios with tuned timeouts (`Scenario::tuned_timeouts`) give them to these only; the
    /// others keep the scenario's own, Envoy Gateway's defaults unless it says otherwise.
    pub fn takes_tuned_timeouts(self) -> bool {
        matches!(self, Variant::BuiltinTunedTimeouts | Variant::ChurnGuardFallback)
    }

    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Builtin => "builtin",
            Variant::BuiltinTuned => "builtin-tuned",
            Variant::BuiltinTunedTimeouts => "builtin-tuned+timeouts",
            Variant::ChurnGuard => "churn-guard",
            Variant::ChurnGuardOverride => "churn-guard+override",
            Variant::ChurnGuardFallback => "churn-guard+fallback",
            Variant::WasmNoop => "wasm-noop",
            Variant::WasmNoopFallback => "wasm-noop+fallback",
            Variant::WasmRetryFloor => "wasm-retry-floor",
        }
    }

    /// `per_try_timeout` is what a user facing hanging connections would set; it is given to the
    /// tuned baseline and to churn-guard alike.
    pub fn filter_config(self, per_try_timeout: Option<std::time::Duration>) -> Option<String> {
        let mut c = match self {
            Variant::Plain | Variant::Builtin | Variant::BuiltinTuned | Variant::BuiltinTunedTimeouts => return None,
            Variant::ChurnGuard | Variant::WasmNoop | Variant::WasmNoopFallback | Variant::WasmRetryFloor => json!({}),
            Variant::ChurnGuardOverride => json!({"endpointOverride": {"header": OVERRIDE_HEADER}}),
            Variant::ChurnGuardFallback => json!({
                "endpointOverride": {"header": OVERRIDE_HEADER},
                "fallback": {"header": FALLBACK_HEADER, "value": "true"}
            }),
        };
        if let Some(t) = per_try_timeout {
            c["retry"] = json!({"perTryTimeoutMs": t.as_millis() as u64});
        }
        Some(c.to_string())
    }

    /// The module to load instead of churn-guard's.
    pub fn module(self) -> Option<std::path::PathBuf> {
        let file = match self {
            Variant::WasmNoop | Variant::WasmNoopFallback => "wasm_noop.wasm",
            Variant::WasmRetryFloor => "wasm_retry_floor.wasm",
            _ => return None,
        };
        Some(harness::envoy::workspace_root().join("target/wasm32-wasip1/release").join(file))
    }

    pub fn spec(self, per_try_timeout: Option<std::time::Duration>) -> GatewaySpec {
        let mut spec = GatewaySpec { expose_response_flags: true, ..GatewaySpec::default() };
        match self {
            Variant::Plain | Variant::ChurnGuard | Variant::WasmNoop | Variant::WasmRetryFloor => {}
            Variant::Builtin => {
                spec.route_retry_policy = Some(retry(
                    2,
                    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                    &[503],
                ));
                spec.outlier_detection = Some(json!({
                    "baseEjectionTime": "30s",
                    "consecutive5xx": 5,
                    "consecutiveGatewayFailure": 0,
                    "consecutiveLocalOriginFailure": 5,
                    "enforcingConsecutiveGatewayFailure": 100,
                    "interval": "3s",
                    "maxEjectionPercent": 10
                }));
            }
            Variant::BuiltinTuned | Variant::BuiltinTunedTimeouts => {
                // `unavailable,cancelled` are Envoy Gateway's gRPC triggers; they change nothing for
                // HTTP answers.
                let mut policy = retry(
                    10,
                    "connect-failure,refused-stream,reset,unavailable,cancelled,retriable-status-codes",
                    &[502, 503, 504],
                );
                if let Some(t) = per_try_timeout {
                    policy["perTryTimeout"] = json!(format!("{:.3}s", t.as_secs_f64()));
                }
                spec.route_retry_policy = Some(policy);
                spec.outlier_detection = Some(json!({
                    "splitExternalLocalOriginErrors": true,
                    "consecutiveLocalOriginFailure": 1,
                    "consecutiveGatewayFailure": 1,
                    "enforcingConsecutiveGatewayFailure": 100,
                    "consecutive5xx": 3,
                    "interval": "1s",
                    "baseEjectionTime": "30s",
                    "maxEjectionPercent": 100
                }));
                spec.common_lb_config = Some(json!({"healthyPanicThreshold": {"value": 0}}));
            }
            Variant::ChurnGuardOverride => spec.endpoint_override_header = Some(OVERRIDE_HEADER.into()),
            Variant::ChurnGuardFallback | Variant::WasmNoopFallback => {
                spec.endpoint_override_header = Some(OVERRIDE_HEADER.into());
                spec.fallback = Some(FallbackRoute { header: FALLBACK_HEADER.into(), value: "true".into() });
            }
        }
        spec
    }
}

/// A route retry policy as Envoy Gateway writes it, with `previous_hosts`.
fn retry(num_retries: u32, retry_on: &str, codes: &[u16]) -> Value {
    json!({
        "numRetries": num_retries,
        "retryOn": retry_on,
        "retriableStatusCodes": codes,
        "hostSelectionRetryMaxAttempts": "5",
        "retryHostPredicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}
        }]
    })
}

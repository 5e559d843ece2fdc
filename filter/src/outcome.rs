//! What one finished request says about the endpoint that served its last attempt.
//!
//! Input is what Envoy exposes to Wasm at the end of a stream: `response.code`,
//! `response.flags` (a bit vector of `StreamInfo::CoreResponseFlag`) and
//! `upstream.address`.

/// Envoy's `response.flags` bit vector; bit positions follow `CoreResponseFlag`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(pub u64);

impl ResponseFlags {
    pub const NO_HEALTHY_UPSTREAM: u64 = 1 << 1; // UH
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 1 << 2; // UT
    pub const LOCAL_RESET: u64 = 1 << 3; // LR
    pub const UPSTREAM_REMOTE_RESET: u64 = 1 << 4; // UR
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 1 << 5; // UF
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 1 << 6; // UC
    pub const UPSTREAM_OVERFLOW: u64 = 1 << 7; // UO
    pub const NO_ROUTE_FOUND: u64 = 1 << 8; // NR
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 1 << 14; // DC
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 1 << 15; // URX
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 1 << 23; // UPE
    pub const NO_CLUSTER_FOUND: u64 = 1 << 24; // NC
    pub const DOWNSTREAM_REMOTE_RESET: u64 = 1 << 28; // DR

    pub fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }
}

/// Failure kinds, in the terms Envoy's outlier detection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing reached the endpoint: connection refused or timed out (UF).
    ConnectFailure,
    /// The connection or stream was reset by the endpoint (UR, UC, UPE).
    Reset,
    /// The endpoint did not answer in time (UT).
    Timeout,
    /// The endpoint answered 502/503/504.
    GatewayError,
    /// Any other 5xx from the endpoint.
    ServerError,
    /// An attempt on a steered endpoint that Envoy retried on the next one. Envoy does not say
    /// why an earlier attempt failed (response flags describe the last one), so it counts as a
    /// gateway error: one alone never ejects, and the endpoint is probed to find out.
    RetriedAttempt,
}

impl FailureKind {
    /// Failures where the endpoint never saw the request.
    pub fn is_local_origin(self) -> bool {
        matches!(self, FailureKind::ConnectFailure)
    }

    pub fn is_gateway_error(self) -> bool {
        !matches!(self, FailureKind::ServerError)
    }

    pub fn name(self) -> &'static str {
        match self {
            FailureKind::ConnectFailure => "connect_failure",
            FailureKind::Reset => "reset",
            FailureKind::Timeout => "timeout",
            FailureKind::GatewayError => "gateway_error",
            FailureKind::ServerError => "server_error",
            FailureKind::RetriedAttempt => "retried_attempt",
        }
    }

    pub const ALL: [FailureKind; 6] = [
        FailureKind::ConnectFailure,
        FailureKind::Reset,
        FailureKind::Timeout,
        FailureKind::GatewayError,
        FailureKind::ServerError,
        FailureKind::RetriedAttempt,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered; it is alive, whatever the status (4xx is the client's business).
    Success,
    Failure(FailureKind),
    /// The cluster had no endpoint to offer (UH): a sign of a stale or empty endpoint set.
    NoUpstream,
    /// Nothing to learn about any endpoint: no route, overflow, downstream went away, local reply.
    Ignore,
}

/// Classifies a finished request. `has_upstream` says whether Envoy recorded an upstream address.
pub fn classify(status: u32, flags: ResponseFlags, has_upstream: bool) -> Outcome {
    const IGNORED: u64 = ResponseFlags::UPSTREAM_OVERFLOW
        | ResponseFlags::NO_ROUTE_FOUND
        | ResponseFlags::NO_CLUSTER_FOUND
        | ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION
        | ResponseFlags::DOWNSTREAM_REMOTE_RESET;
    if flags.has(ResponseFlags::NO_HEALTHY_UPSTREAM) {
        return Outcome::NoUpstream;
    }
    if flags.0 & IGNORED != 0 || !has_upstream {
        return Outcome::Ignore;
    }
    if flags.has(ResponseFlags::UPSTREAM_CONNECTION_FAILURE) {
        return Outcome::Failure(FailureKind::ConnectFailure);
    }
    if flags.has(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT) {
        return Outcome::Failure(FailureKind::Timeout);
    }
    if flags.0
        & (ResponseFlags::UPSTREAM_REMOTE_RESET
            | ResponseFlags::UPSTREAM_CONNECTION_TERMINATION
            | ResponseFlags::UPSTREAM_PROTOCOL_ERROR
            | ResponseFlags::LOCAL_RESET)
        != 0
    {
        return Outcome::Failure(FailureKind::Reset);
    }
    match status {
        502..=504 => Outcome::Failure(FailureKind::GatewayError),
        500..=599 => Outcome::Failure(FailureKind::ServerError),
        // 0: the stream ended without a response, and no flag explains why.
        0 => Outcome::Ignore,
        _ => Outcome::Success,
    }
}

/// The HTTP status a gRPC status stands for, as Envoy maps it for its own outlier detection and
/// stats (`Grpc::Utility::grpcToHttpStatus`): UNAVAILABLE is a 503, INTERNAL a 500, and so on.
pub fn grpc_to_http(grpc_status: u32) -> u32 {
    match grpc_status {
        0 => 200,          // OK
        1 => 499,          // CANCELLED
        3 | 9 | 11 => 400, // INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
        4 => 504,          // DEADLINE_EXCEEDED
        5 => 404,          // NOT_FOUND
        6 | 10 => 409,     // ALREADY_EXISTS, ABORTED
        7 => 403,          // PERMISSION_DENIED
        8 => 429,          // RESOURCE_EXHAUSTED
        12 => 501,         // UNIMPLEMENTED
        14 => 503,         // UNAVAILABLE
        16 => 401,         // UNAUTHENTICATED
        _ => 500,          // UNKNOWN, INTERNAL, DATA_LOSS, and codes gRPC does not define
    }
}

/// The status to classify a finished request by: a gRPC call's `grpc-status` when there is one
/// (its HTTP status is 200 whatever happened), else the HTTP status.
pub fn effective_status(http_status: u32, grpc_status: Option<u32>) -> u32 {
    match grpc_status {
        Some(code) if http_status == 200 => grpc_to_http(code),
        _ => http_status,
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn f(bits: u64) -> ResponseFlags {
        ResponseFlags(bits)
    }

    #[test]
    fn plain_answers_are_success() {
        assert_eq!(classify(200, f(0), true), Outcome::Success);
        assert_eq!(classify(404, f(0), true), Outcome::Success);
        assert_eq!(classify(429, f(0), true), Outcome::Success);
    }

    #[test]
    fn connect_failure_with_retries_exhausted() {
        let flags = f(ResponseFlags::UPSTREAM_CONNECTION_FAILURE | ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        assert_eq!(classify(503, flags, true), Outcome::Failure(FailureKind::ConnectFailure));
        assert!(FailureKind::ConnectFailure.is_local_origin());
    }

    #[test]
    fn resets_and_timeouts() {
        assert_eq!(
            classify(503, f(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION), true),
            Outcome::Failure(FailureKind::Reset)
        );
        assert_eq!(classify(503, f(ResponseFlags::UPSTREAM_REMOTE_RESET), true), Outcome::Failure(FailureKind::Reset));
        assert_eq!(
            classify(504, f(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT), true),
            Outcome::Failure(FailureKind::Timeout)
        );
    }

    #[test]
    fn upstream_status_codes() {
        assert_eq!(classify(503, f(0), true), Outcome::Failure(FailureKind::GatewayError));
        assert_eq!(classify(500, f(0), true), Outcome::Failure(FailureKind::ServerError));
        assert!(!FailureKind::ServerError.is_gateway_error());
    }

    #[test]
    fn a_retried_attempt_is_a_gateway_error_not_a_connect_failure() {
        assert!(FailureKind::RetriedAttempt.is_gateway_error());
        assert!(!FailureKind::RetriedAttempt.is_local_origin());
    }

    #[test]
    fn not_the_endpoints_fault() {
        assert_eq!(classify(503, f(ResponseFlags::UPSTREAM_OVERFLOW), true), Outcome::Ignore);
        assert_eq!(classify(404, f(ResponseFlags::NO_ROUTE_FOUND), false), Outcome::Ignore);
        assert_eq!(classify(0, f(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION), true), Outcome::Ignore);
        assert_eq!(classify(200, f(0), false), Outcome::Ignore);
        assert_eq!(classify(0, f(0), true), Outcome::Ignore);
    }

    #[test]
    fn grpc_statuses_classify_like_the_http_codes_envoy_maps_them_to() {
        let grpc = |code| classify(effective_status(200, Some(code)), f(0), true);
        assert_eq!(grpc(0), Outcome::Success);
        assert_eq!(grpc(14), Outcome::Failure(FailureKind::GatewayError), "UNAVAILABLE");
        assert_eq!(grpc(4), Outcome::Failure(FailureKind::GatewayError), "DEADLINE_EXCEEDED");
        assert_eq!(grpc(13), Outcome::Failure(FailureKind::ServerError), "INTERNAL");
        assert_eq!(grpc(99), Outcome::Failure(FailureKind::ServerError), "undefined codes");
        for client_side in [1, 3, 5, 7, 8, 16] {
            assert_eq!(grpc(client_side), Outcome::Success, "{client_side} is the caller's business");
        }
        assert_eq!(effective_status(200, None), 200);
        assert_eq!(effective_status(503, Some(0)), 503, "a non-200 HTTP status is not a gRPC answer");
    }

    #[test]
    fn a_reset_after_the_answer_began_is_a_failure() {
        // A gRPC stream, or an HTTP body, cut by the endpoint after a 200 started.
        assert_eq!(classify(200, f(ResponseFlags::UPSTREAM_REMOTE_RESET), true), Outcome::Failure(FailureKind::Reset));
        assert_eq!(
            classify(200, f(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION), true),
            Outcome::Failure(FailureKind::Reset)
        );
        assert_eq!(classify(200, f(ResponseFlags::DOWNSTREAM_REMOTE_RESET), true), Outcome::Ignore, "the client left");
    }

    #[test]
    fn no_healthy_upstream_is_a_cluster_signal() {
        assert_eq!(classify(503, f(ResponseFlags::NO_HEALTHY_UPSTREAM), false), Outcome::NoUpstream);
    }
}

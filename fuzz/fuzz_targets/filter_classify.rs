//! `classify` on arbitrary status, flags and upstream presence: never panics, and follows the
//! precedence outcome.rs documents.
#![no_main]

use churn_guard::outcome::{classify, FailureKind, Outcome, ResponseFlags as F};
use libfuzzer_sys::fuzz_target;

const IGNORED: u64 = F::UPSTREAM_OVERFLOW
    | F::NO_ROUTE_FOUND
    | F::NO_CLUSTER_FOUND
    | F::DOWNSTREAM_CONNECTION_TERMINATION
    | F::DOWNSTREAM_REMOTE_RESET;
const RESETS: u64 =
    F::UPSTREAM_REMOTE_RESET | F::UPSTREAM_CONNECTION_TERMINATION | F::UPSTREAM_PROTOCOL_ERROR | F::LOCAL_RESET;
const FAILURE_FLAGS: u64 = F::UPSTREAM_CONNECTION_FAILURE | F::UPSTREAM_REQUEST_TIMEOUT | RESETS;

fuzz_target!(|input: (u32, u64, bool)| {
    let (status, bits, has_upstream) = input;
    let flags = F(bits);
    let outcome = classify(status, flags, has_upstream);
    assert_eq!(outcome, classify(status, flags, has_upstream));

    // UH wins over everything: the cluster had nothing to offer.
    assert_eq!(outcome == Outcome::NoUpstream, flags.has(F::NO_HEALTHY_UPSTREAM));
    if flags.has(F::NO_HEALTHY_UPSTREAM) {
        return;
    }
    // Without an upstream, or with a flag that is nobody's fault, nothing is learnt.
    if !has_upstream || bits & IGNORED != 0 {
        assert_eq!(outcome, Outcome::Ignore);
        return;
    }
    // Bits classify does not know (retry limit, others) never change the answer.
    let known = F::NO_HEALTHY_UPSTREAM | IGNORED | FAILURE_FLAGS;
    assert_eq!(outcome, classify(status, F(bits & known), has_upstream));
    match outcome {
        Outcome::Success => {
            // An answer with no failure flag that is not a 5xx: the endpoint is alive.
            assert!(bits & FAILURE_FLAGS == 0 && status != 0 && !(500..=599).contains(&status));
        }
        Outcome::Failure(kind) => {
            if bits & FAILURE_FLAGS == 0 {
                assert!((500..=599).contains(&status));
                assert_eq!(kind == FailureKind::GatewayError, (502..=504).contains(&status));
            }
            assert_eq!(kind.is_local_origin(), kind == FailureKind::ConnectFailure);
            assert!(!kind.name().is_empty());
        }
        Outcome::Ignore => assert!(status == 0 && bits & FAILURE_FLAGS == 0),
        Outcome::NoUpstream => unreachable!("handled above"),
    }
    if bits & FAILURE_FLAGS == 0 && (200..=299).contains(&status) {
        assert_eq!(outcome, Outcome::Success, "a 2xx with no failure flag is a success");
    }
});

//! Decoding of Envoy property bytes: `int`, `string`, `is_ip_endpoint` never panic and agree
//! with the formats they document.
#![no_main]

use churn_guard::properties::{int, is_ip_endpoint, string};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match int(data) {
        Some(v) => assert_eq!(&v.to_le_bytes()[..], data),
        None => assert_ne!(data.len(), 8),
    }
    let s = string(data.to_vec());
    match &s {
        Some(s) => assert_eq!(s.as_bytes(), data),
        None => assert!(data.is_empty() || std::str::from_utf8(data).is_err()),
    }
    let text = String::from_utf8_lossy(data);
    if is_ip_endpoint(&text) {
        assert!(text.len() <= 64);
        let addr: std::net::SocketAddr = text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"));
        // What was accepted is an address the filter can key a table on and show again.
        assert!(is_ip_endpoint(&addr.to_string()));
    }
});

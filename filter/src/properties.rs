//! Decoding of Envoy attribute values as proxy-wasm hands them over: strings and bytes as-is,
//! integers as 8 little-endian bytes.

pub fn int(bytes: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = bytes.try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}

/// A UTF-8 string value; `None` for empty or invalid ones.
pub fn string(bytes: Vec<u8>) -> Option<String> {
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// Whether `address` looks like what `upstream.address` carries for an IP endpoint
/// (`10.0.0.1:8080`, `[::1]:8080`). Anything else (pipes, internal addresses) is not tracked.
pub fn is_ip_endpoint(address: &str) -> bool {
    address.len() <= 64 && address.parse::<std::net::SocketAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn ints_are_eight_le_bytes() {
        assert_eq!(int(&200u64.to_le_bytes()), Some(200));
        assert_eq!(int(&[1, 2, 3]), None);
        assert_eq!(int(&[]), None);
    }

    #[test]
    fn strings() {
        assert_eq!(string(b"x".to_vec()).as_deref(), Some("x"));
        assert_eq!(string(vec![]), None);
        assert_eq!(string(vec![0xff]), None);
    }

    #[test]
    fn endpoints() {
        assert!(is_ip_endpoint("127.0.0.1:9000"));
        assert!(is_ip_endpoint("[::1]:80"));
        assert!(!is_ip_endpoint("envoy://internal_client_address/"));
        assert!(!is_ip_endpoint("127.0.0.1"));
        assert!(!is_ip_endpoint(""));
    }
}

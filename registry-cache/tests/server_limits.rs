//! A client that trickles its headers for ever (slowloris) is cut off, and others are served.

mod common;

use registry_cache::server::ServerLimits;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_headers_is_cut_off() {
    let limits = ServerLimits { header_read_timeout: Duration::from_secs(1), ..ServerLimits::default() };
    let addr = common::serve_minimal(limits).await;
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let trickle = async {
        for byte in b"GET / HTTP/1.1\r\nHost: cache\r\nX-Slow: ".iter().cycle() {
            if slow.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // Far beyond the limit: the server must have closed the connection by then.
    let cut = tokio::time::timeout(Duration::from_secs(20), trickle).await;
    assert!(cut.is_ok(), "the server still waits for the headers after 20 s");
    let mut rest = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(1), slow.read_to_end(&mut rest)).await;
    assert!(common::answers(addr).await, "others are still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_the_tls_handshake_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = common::TestCa::new(dir.path(), "limits");
    let (crt, key) = ca.leaf();
    let mut volume = common::SecretVolume::new(&dir.path().join("tls"));
    volume.project(&[("tls.crt", &crt), ("tls.key", &key)]);
    let tls = registry_cache::tls::ServerTls::load(volume.path("tls.crt"), volume.path("tls.key")).expect("TLS pair");
    let limits = ServerLimits { header_read_timeout: Duration::from_secs(1), ..ServerLimits::default() };
    let addr = common::serve_minimal_tls(limits, &tls).await;
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    // A TLS record header announcing a 512-byte ClientHello, whose bytes then trickle in.
    let trickle = async {
        if slow.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.is_err() {
            return;
        }
        loop {
            if slow.write_all(&[0x01]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let cut = tokio::time::timeout(Duration::from_secs(20), trickle).await;
    assert!(cut.is_ok(), "the server still waits for the handshake after 20 s");
    let url = format!("https://localhost:{}/", addr.port());
    assert!(common::get_ok(&common::https_client(&ca.cert), &url).await, "others are still served over TLS");
}

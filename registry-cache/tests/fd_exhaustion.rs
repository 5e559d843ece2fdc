//! The process runs out of file descriptors while a client connects: the server's accept
//! fails, and it must go on serving once descriptors are free again. In a file of its own,
//! because it lowers the limit for the whole test process.

mod common;

use registry_cache::server::ServerLimits;
use std::time::Duration;

/// Open file descriptors of this process.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0)
}

fn set_fd_limit(soft: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let previous = limit.rlim_cur;
        limit.rlim_cur = soft.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "setrlimit");
        previous
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_stop_the_server() {
    let addr = common::serve_minimal(ServerLimits::default()).await;
    assert!(common::answers(addr).await);
    // A client in another process connects while this one has no descriptor left, so the
    // server's accept fails with EMFILE.
    let mut client = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("sleep 0.5; curl -s -m 3 -o /dev/null http://{addr}/"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sh and curl");
    let previous = set_fd_limit(open_fds() + 4);
    let mut hoard = vec![];
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hoard.push(f);
    }
    assert!(std::fs::File::open("/dev/null").is_err(), "descriptors left");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(hoard);
    set_fd_limit(previous);
    let _ = client.wait().await;
    assert!(common::answers(addr).await, "the server stopped when accept failed");
}

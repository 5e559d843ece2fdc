//! Ctrl-C in the middle of the demo leaves nothing behind: no Envoy, no registry, no backend.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Processes (other than those already gone) whose environment carries `marker`.
fn processes_with(marker: &str) -> Vec<(u32, String)> {
    let needle = format!("CHURN_LAB_TEST_MARKER={marker}");
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else { continue };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // A zombie has exited; only its parent's bookkeeping is left.
            if !state.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) {
                found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
            }
        }
    }
    found
}

fn interrupt_demo_at(line_starting: &str, signal_group: bool) {
    let marker = format!("{}-{}", std::process::id(), line_starting.len());
    let out = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_churn-lab"));
    cmd.args(["demo", "--pods", "6", "--lag", "3", "--rate", "50", "--out"])
        .arg(out.path())
        .env("CHURN_LAB_TEST_MARKER", &marker)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Its own process group, as a shell gives a foreground job.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().expect("churn-lab");
    let pid = child.id() as i32;
    let stderr = child.stderr.take().expect("stderr");
    // Keep draining after the line is seen: a closed pipe would fail the demo's next write.
    let (lines, seen_lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut seen = vec![];
    for line in seen_lines.iter() {
        let hit = line.trim_start().starts_with(line_starting);
        seen.push(line);
        if hit {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.trim_start().starts_with(line_starting)),
        "the demo ended before {line_starting:?}:\n{}",
        seen.join("\n")
    );
    let running = processes_with(&marker);
    assert!(running.len() >= 3, "expected the demo, Envoy and the registry to be running: {running:?}");
    // Ctrl-C in a terminal signals the whole foreground group; `kill -INT` only the demo.
    unsafe {
        libc::kill(if signal_group { -pid } else { pid }, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not stop after SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(130), "an interrupted demo exits with 130, as shells expect");
    // Children are reaped by their parent's teardown; give the kernel a moment to finish.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_with(&marker);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left behind after Ctrl-C: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctrl_c_during_the_rollout_leaves_no_process_behind() {
    interrupt_demo_at("rolling restart of", false);
}

#[test]
fn ctrl_c_to_the_whole_process_group_leaves_no_process_behind() {
    interrupt_demo_at("demo plain", true);
}

//! Makes pod addresses vanish without a reset: iptables drops their packets, so connects and
//! requests in flight time out, as when a pod's IP is gone from the network.

use std::net::SocketAddr;
use std::process::Command;

const CHAIN: &str = "CHURNLAB";

pub struct Blackhole;

fn iptables(args: &[&str]) -> bool {
    Command::new("iptables").args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

impl Blackhole {
    pub fn new() -> anyhow::Result<Self> {
        Self::cleanup();
        if !(iptables(&["-N", CHAIN]) && iptables(&["-I", "INPUT", "-i", "lo", "-j", CHAIN])) {
            anyhow::bail!("iptables is needed (as root) to make addresses vanish; `make setup` installs it");
        }
        Ok(Self)
    }

    pub fn drop_traffic_to(&self, addr: SocketAddr) {
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        iptables(&["-A", CHAIN, "-d", &ip, "-p", "tcp", "--dport", &port, "-j", "DROP"]);
    }

    fn cleanup() {
        while iptables(&["-D", "INPUT", "-i", "lo", "-j", CHAIN]) {}
        iptables(&["-F", CHAIN]);
        iptables(&["-X", CHAIN]);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        Self::cleanup();
    }
}

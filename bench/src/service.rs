//! The Service path, modelled on kube-proxy rather than kinder than it:
//!
//! - it learns endpoint changes `delay` late (kube-proxy applies EndpointSlices about a second
//!   after they change);
//! - each new connection goes to one pod picked at random from what it knows, with no second
//!   try inside the Service: a connection to a pod that is gone fails. In iptables mode the
//!   client's own connect would be refused or time out; through this userspace stand-in the
//!   client's connect succeeds and is then reset, or hangs;
//! - a connection already open to a pod that vanishes hangs, as conntrack keeps it pinned.

use crate::lagged::LaggedView;
use crate::pods::Endpoints;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How late kube-proxy applies an EndpointSlice change.
pub const KUBE_PROXY_DELAY: Duration = Duration::from_secs(1);

pub struct ServiceProxy {
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl ServiceProxy {
    pub async fn start(truth: Endpoints, delay: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let known: Endpoints = Arc::new(RwLock::new(truth.read().map(|v| v.clone()).unwrap_or_default()));
        let follower = tokio::spawn(follow(truth, Arc::clone(&known), delay));
        let proxy = tokio::spawn(async move {
            let mut seed = u64::from(addr.port()) | 1;
            loop {
                let Ok((downstream, _)) = listener.accept().await else { continue };
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let pods = known.read().map(|v| v.clone()).unwrap_or_default();
                let pod = pods.get((seed % pods.len().max(1) as u64) as usize).copied();
                tokio::spawn(forward(downstream, pod));
            }
        });
        Ok(Self { addr, tasks: vec![follower, proxy] })
    }
}

/// Copies the truth into `known`, `delay` late.
async fn follow(truth: Endpoints, known: Endpoints, delay: Duration) {
    let mut view = LaggedView::default();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let now = Instant::now();
        view.observe(now, truth.read().map(|v| v.clone()).unwrap_or_default());
        if let (Some(state), Ok(mut k)) = (view.due(now, delay), known.write()) {
            if *k != *state {
                k.clone_from(state);
            }
        }
    }
}

async fn forward(mut downstream: TcpStream, pod: Option<SocketAddr>) {
    let upstream = match pod {
        Some(pod) => TcpStream::connect(pod).await.ok(),
        None => None,
    };
    match upstream {
        Some(mut upstream) => {
            let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
        }
        // Refused (or no pod at all): the client sees its connection reset.
        None => {
            let _ = downstream.set_zero_linger();
        }
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

//! The Service path: a TCP proxy that, like kube-proxy, sends each new connection to a pod that
//! is ready right now. It always knows the live pods, because it follows the EndpointSlice
//! truth directly instead of through the lagging control plane.

use crate::pods::Endpoints;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct ServiceProxy {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ServiceProxy {
    pub async fn start(endpoints: Endpoints) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut downstream, _)) = listener.accept().await else { continue };
                let endpoints = endpoints.clone();
                let next = Arc::clone(&next);
                tokio::spawn(async move {
                    let pods = endpoints.read().map(|v| v.clone()).unwrap_or_default();
                    for attempt in 0..pods.len().min(3) {
                        let i = next.fetch_add(1, Ordering::Relaxed).wrapping_add(attempt);
                        let Some(pod) = pods.get(i % pods.len().max(1)) else { return };
                        if let Ok(mut upstream) = TcpStream::connect(pod).await {
                            let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

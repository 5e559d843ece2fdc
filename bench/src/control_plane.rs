//! A control plane that translates slowly: Envoy gets the EndpointSlice truth `lag` late, in
//! batches every `batch`, through real xDS (file-based EDS that Envoy watches).

use crate::lagged::LaggedView;
use crate::pods::Endpoints;
use harness::gateway::XdsFiles;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub struct ControlPlane {
    task: JoinHandle<()>,
}

impl ControlPlane {
    pub fn start(dir: PathBuf, cluster: &'static str, truth: Endpoints, lag: Duration, batch: Duration) -> Self {
        let task = tokio::spawn(async move {
            let mut xds = XdsFiles::new(&dir);
            let mut view = LaggedView::default();
            let mut published: Option<Vec<SocketAddr>> = None;
            let mut sample = tokio::time::interval(Duration::from_millis(50));
            let mut next_push = Instant::now() + batch;
            loop {
                sample.tick().await;
                let now = Instant::now();
                view.observe(now, truth.read().map(|v| v.clone()).unwrap_or_default());
                if now < next_push {
                    continue;
                }
                next_push = now + batch;
                let Some(state) = view.due(now, lag) else { continue };
                if published.as_ref() != Some(state) {
                    let mut sorted = state.clone();
                    sorted.sort();
                    if xds.write_endpoints(cluster, &sorted).is_ok() {
                        published = Some(state.clone());
                    }
                }
            }
        });
        Self { task }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

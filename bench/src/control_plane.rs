//! A control plane that translates slowly: Envoy gets the EndpointSlice truth `lag` late, in
//! batches every `batch`, through real xDS (file-based EDS that Envoy watches).

use crate::pods::Endpoints;
use harness::gateway::XdsFiles;
use std::collections::VecDeque;
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
            let mut history: VecDeque<(Instant, Vec<SocketAddr>)> = VecDeque::new();
            let mut published: Option<Vec<SocketAddr>> = None;
            let mut sample = tokio::time::interval(Duration::from_millis(50));
            let mut next_push = Instant::now() + batch;
            loop {
                sample.tick().await;
                let now = Instant::now();
                let current = truth.read().map(|v| v.clone()).unwrap_or_default();
                if history.back().map(|(_, v)| v) != Some(&current) {
                    history.push_back((now, current));
                }
                if now < next_push {
                    continue;
                }
                next_push = now + batch;
                // The newest state that is at least `lag` old.
                let Some(cutoff) = now.checked_sub(lag) else { continue };
                while history.len() > 1 && history.get(1).is_some_and(|(t, _)| *t <= cutoff) {
                    history.pop_front();
                }
                let Some((t, state)) = history.front() else { continue };
                if *t <= cutoff && published.as_ref() != Some(state) {
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

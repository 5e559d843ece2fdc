//! A view of the EndpointSlice truth that is some time late, as every consumer of it is: the
//! control plane that translates for Envoy, and kube-proxy.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Default)]
pub struct LaggedView {
    /// Every state seen, with when it was first seen; only the newest one that is due is kept.
    history: VecDeque<(Instant, Vec<SocketAddr>)>,
}

impl LaggedView {
    /// Records the truth as it is at `now`.
    pub fn observe(&mut self, now: Instant, current: Vec<SocketAddr>) {
        if self.history.back().map(|(_, v)| v) != Some(&current) {
            self.history.push_back((now, current));
        }
    }

    /// The newest state that is at least `lag` old at `now`, if any is.
    pub fn due(&mut self, now: Instant, lag: Duration) -> Option<&Vec<SocketAddr>> {
        let cutoff = now.checked_sub(lag)?;
        while self.history.len() > 1 && self.history.get(1).is_some_and(|(t, _)| *t <= cutoff) {
            self.history.pop_front();
        }
        self.history.front().filter(|(t, _)| *t <= cutoff).map(|(_, v)| v)
    }
}

//! A Deployment of "pods" on loopback and its rolling update, as the Deployment controller does
//! it: new pods up to `replicas + maxSurge`, old pods down while at least
//! `replicas - maxUnavailable` are ready, new pods ready after a readiness delay.
//!
//! Each pod has its own loopback IP (127.1.x.y), like a pod IP, and a new pod never reuses an
//! old one's. `ready` is what the EndpointSlice says right now; the control plane passes it on
//! to Envoy late.

use crate::blackhole::Blackhole;
use harness::grpc::GrpcUpstream;
use harness::upstream::Upstream;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// SIGTERM handled: stop accepting (connections are refused), drain keep-alive connections.
    Graceful,
    /// The process dies: connections are reset, the port refuses.
    Abrupt,
    /// The pod's IP disappears from the network without a reset: packets are dropped, so
    /// connects and requests in flight time out (needs iptables).
    Vanish,
    /// Every other pod graceful, the rest abrupt: some refuse and drain, some reset.
    Mixed,
}

/// What the pods serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 GETs.
    #[default]
    Http,
    /// Unary gRPC calls over h2c (the `grpc.health.v1.Health/Check` service).
    Grpc,
}

/// One pod's server.
enum Server {
    Http(Upstream),
    Grpc(GrpcUpstream),
}

impl Server {
    async fn start(protocol: Protocol, name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(match protocol {
            Protocol::Http => Server::Http(Upstream::start_on(name, addr).await?),
            Protocol::Grpc => Server::Grpc(GrpcUpstream::start_on(name, addr).await?),
        })
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Server::Http(u) => u.addr,
            Server::Grpc(u) => u.addr,
        }
    }

    fn drain(&mut self) {
        match self {
            Server::Http(u) => u.drain(),
            Server::Grpc(u) => u.drain(),
        }
    }

    fn kill_now(&mut self) {
        match self {
            Server::Http(u) => u.kill_now(),
            Server::Grpc(u) => u.kill_now(),
        }
    }

    fn hits(&self) -> u64 {
        match self {
            Server::Http(u) => u.hits(),
            Server::Grpc(u) => u.calls(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RolloutSpec {
    pub replicas: usize,
    pub max_surge: f64,
    pub max_unavailable: f64,
    pub readiness_delay: Duration,
    pub termination: Termination,
}

impl RolloutSpec {
    /// maxSurge rounds up and maxUnavailable down, as Kubernetes does; both 0 means surge 1.
    pub fn limits(&self) -> (usize, usize) {
        let surge = (self.replicas as f64 * self.max_surge).ceil() as usize;
        let unavailable = (self.replicas as f64 * self.max_unavailable).floor() as usize;
        if surge == 0 && unavailable == 0 {
            (1, 0)
        } else {
            (surge, unavailable)
        }
    }
}

struct Pod {
    id: usize,
    upstream: Server,
    generation: u32,
    ready_at: Instant,
}

/// Shared view of the pods that are ready and not terminating: the EndpointSlice truth, which
/// kube-proxy (the Service path) follows at once.
pub type Endpoints = Arc<RwLock<Vec<SocketAddr>>>;

pub struct Deployment {
    pods: Vec<Pod>,
    terminated: Vec<Server>,
    next_id: usize,
    protocol: Protocol,
    pub endpoints: Endpoints,
    blackhole: Option<Blackhole>,
}

fn pod_ip(id: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (id / 250) as u8, (id % 250 + 1) as u8))
}

impl Deployment {
    /// Starts `replicas` ready pods.
    pub async fn start(replicas: usize, termination: Termination, protocol: Protocol) -> anyhow::Result<Self> {
        let blackhole = if termination == Termination::Vanish { Some(Blackhole::new()?) } else { None };
        let mut d =
            Self { pods: vec![], terminated: vec![], next_id: 0, protocol, endpoints: Arc::default(), blackhole };
        let now = Instant::now();
        for _ in 0..replicas {
            d.create(0, now).await?;
        }
        d.publish(now);
        Ok(d)
    }

    async fn create(&mut self, generation: u32, ready_at: Instant) -> anyhow::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        let upstream = Server::start(self.protocol, &format!("pod-{id}"), SocketAddr::new(pod_ip(id), 0)).await?;
        self.pods.push(Pod { id, upstream, generation, ready_at });
        Ok(())
    }

    pub fn ready_addrs(&self, now: Instant) -> Vec<SocketAddr> {
        self.pods.iter().filter(|p| p.ready_at <= now).map(|p| p.upstream.addr()).collect()
    }

    fn publish(&self, now: Instant) {
        if let Ok(mut e) = self.endpoints.write() {
            *e = self.ready_addrs(now);
        }
    }

    fn terminate(&mut self, index: usize, how: Termination) {
        let mut pod = self.pods.swap_remove(index);
        let how = match how {
            Termination::Mixed if pod.id.is_multiple_of(2) => Termination::Graceful,
            Termination::Mixed => Termination::Abrupt,
            how => how,
        };
        match how {
            Termination::Graceful => pod.upstream.drain(),
            Termination::Abrupt | Termination::Mixed => pod.upstream.kill_now(),
            Termination::Vanish => {
                if let Some(b) = &self.blackhole {
                    b.drop_traffic_to(pod.upstream.addr());
                }
            }
        }
        self.terminated.push(pod.upstream);
    }

    /// Replaces every pod of the current generation, Kubernetes-style. Returns when the last
    /// new pod is ready and the last old one is gone.
    pub async fn rolling_update(&mut self, spec: &RolloutSpec) -> anyhow::Result<()> {
        let (surge, unavailable) = spec.limits();
        let n = spec.replicas;
        let generation = self.pods.iter().map(|p| p.generation).max().unwrap_or(0) + 1;
        loop {
            let now = Instant::now();
            let new = self.pods.iter().filter(|p| p.generation == generation).count();
            let old = self.pods.len() - new;
            if old == 0 && self.pods.iter().all(|p| p.ready_at <= now) {
                self.publish(now);
                return Ok(());
            }
            let creatable = (n + surge).saturating_sub(self.pods.len()).min(n.saturating_sub(new));
            for _ in 0..creatable {
                self.create(generation, now + spec.readiness_delay).await?;
            }
            let mut ready = self.pods.iter().filter(|p| p.ready_at <= now).count();
            while ready > n.saturating_sub(unavailable) {
                let Some(i) = self.pods.iter().position(|p| p.generation != generation) else { break };
                self.terminate(i, spec.termination);
                ready -= 1;
            }
            self.publish(now);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Requests served by every pod, old and new.
    pub fn total_hits(&self) -> u64 {
        self.pods.iter().map(|p| p.upstream.hits()).chain(self.terminated.iter().map(Server::hits)).sum()
    }
}

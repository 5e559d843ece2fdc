//! Real gRPC upstream servers ("pods") on loopback: tonic's generated `grpc.health.v1.Health`
//! service over h2c, with the failure modes gRPC endpoints show while they churn. A real gRPC
//! client (tonic's) calls them through Envoy.

use crate::lifecycle::{follow, Listening};
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::codegen::tokio_stream::{self, Stream};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Response metadata naming the pod that answered.
pub const UPSTREAM_METADATA: &str = "x-upstream";

/// How a gRPC pod answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GrpcMode {
    /// `Check` answers SERVING; `Watch` sends SERVING, then ends with OK.
    Serving = 0,
    /// `Check` fails with UNAVAILABLE in a trailers-only response; `Watch` sends one message,
    /// then ends with UNAVAILABLE in the trailers. What a server shedding load, or shutting
    /// down, answers.
    Unavailable = 1,
}

struct Shared {
    name: String,
    mode: AtomicU8,
    calls: AtomicU64,
    unavailable: AtomicU64,
}

impl Shared {
    fn mode(&self) -> GrpcMode {
        match self.mode.load(Ordering::SeqCst) {
            1 => GrpcMode::Unavailable,
            _ => GrpcMode::Serving,
        }
    }

    fn answer<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        if let Ok(name) = self.name.parse() {
            response.metadata_mut().insert(UPSTREAM_METADATA, name);
        }
        response
    }

    fn unavailable(&self) -> Status {
        self.unavailable.fetch_add(1, Ordering::SeqCst);
        Status::unavailable(format!("{} is shutting down", self.name))
    }
}

#[derive(Clone)]
struct Service(Arc<Shared>);

fn serving() -> HealthCheckResponse {
    HealthCheckResponse { status: ServingStatus::Serving as i32 }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Service {
    async fn check(&self, _: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        match self.0.mode() {
            GrpcMode::Serving => Ok(self.0.answer(serving())),
            GrpcMode::Unavailable => Err(self.0.unavailable()),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let mut items = vec![Ok(serving())];
        if self.0.mode() == GrpcMode::Unavailable {
            items.push(Err(self.0.unavailable()));
        }
        Ok(self.0.answer(Box::pin(tokio_stream::iter(items)) as WatchStream))
    }
}

/// One gRPC server over h2c. Dropping it kills it.
pub struct GrpcUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    listening: Option<Listening>,
}

impl GrpcUpstream {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_on(name, "127.0.0.1:0".parse()?).await
    }

    /// Starts on a given address (port 0 picks one), e.g. a pod's own loopback IP.
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            mode: AtomicU8::new(GrpcMode::Serving as u8),
            calls: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
        });
        let mut up = Self { addr, shared, listening: None };
        up.listen().await?;
        Ok(up)
    }

    async fn listen(&mut self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        let service = HealthServer::new(Service(Arc::clone(&self.shared)));
        self.listening = Some(Listening::start(listener, move |stream, rx| {
            let service = TowerToHyperService::new(service.clone());
            async move {
                let conn = http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                follow(conn, rx, |c| c.graceful_shutdown()).await;
            }
        }));
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn set_mode(&self, mode: GrpcMode) {
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// The process is gone: the port refuses connections, open ones close at once.
    pub fn kill_now(&mut self) {
        if let Some(l) = self.listening.as_mut() {
            l.kill_now();
        }
    }

    /// SIGTERM handled well: stop accepting, GOAWAY, finish calls in flight.
    pub fn drain(&mut self) {
        if let Some(l) = self.listening.as_mut() {
            l.drain();
        }
    }

    /// From now on the port accepts connections and resets them at once, as a pod whose server
    /// is gone but whose port is still answered (a sidecar or proxy shutting down). Connections
    /// already open close now.
    pub async fn reset_connections(&mut self) -> anyhow::Result<()> {
        self.kill_now();
        tokio::task::yield_now().await;
        let listener = TcpListener::bind(self.addr).await?;
        let resetting = tokio::spawn(async move {
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_zero_linger();
                    drop(stream);
                }
            }
        });
        if let Some(l) = self.listening.as_mut() {
            l.replace_accept(resetting);
        }
        Ok(())
    }

    /// Calls this pod received.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// Calls this pod failed with UNAVAILABLE.
    pub fn unavailable_answers(&self) -> u64 {
        self.shared.unavailable.load(Ordering::SeqCst)
    }
}

/// A gRPC client for the Health service, over h2c to `port` on loopback (Envoy's listener).
pub async fn client(port: u16) -> anyhow::Result<HealthClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .timeout(Duration::from_secs(30))
        .connect()
        .await?;
    Ok(HealthClient::new(channel))
}

/// One unary `Check`: the pod that answered, or the call's status.
pub async fn check(client: &mut HealthClient<tonic::transport::Channel>) -> Result<String, Status> {
    let response = client.check(HealthCheckRequest { service: String::new() }).await?;
    Ok(response.metadata().get(UPSTREAM_METADATA).and_then(|v| v.to_str().ok()).unwrap_or("?").to_string())
}

/// One server-streaming `Watch`, read to its end: the messages received, then the final status.
pub async fn watch(client: &mut HealthClient<tonic::transport::Channel>) -> (usize, Result<(), Status>) {
    let mut stream = match client.watch(HealthCheckRequest { service: String::new() }).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (0, Err(status)),
    };
    let mut messages = 0;
    loop {
        match stream.message().await {
            Ok(Some(_)) => messages += 1,
            Ok(None) => return (messages, Ok(())),
            Err(status) => return (messages, Err(status)),
        }
    }
}

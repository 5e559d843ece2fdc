//! Real HTTP/1.1 upstream servers on loopback ("pods"), with the failure modes endpoints show
//! while they churn: refusing connections, resetting after reading a request, answering 503.

use crate::lifecycle::{follow, Listening};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

/// How an upstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// 200 with the upstream's name.
    Ok = 0,
    /// Reads the whole request, then closes the connection without answering.
    ResetAfterRequest = 1,
    /// 503, as a pod that is shutting down might.
    Unavailable = 2,
    /// 503 to every other request and 200 to the rest: alive, but shedding load. The filter's
    /// probes are answered and do not count, so that clients' requests alternate whatever the
    /// filter probes (a probe taking a 200 would give clients two 503s in a row).
    UnavailableEveryOther = 3,
    /// Reads the request and never answers, nor closes: a pod whose address vanished (its
    /// packets dropped) or whose process froze. Nothing fails; requests just wait.
    Silent = 4,
    /// 504, as a pod whose own proxy lost its backend might.
    GatewayTimeout = 5,
}

impl Mode {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Mode::ResetAfterRequest,
            2 => Mode::Unavailable,
            3 => Mode::UnavailableEveryOther,
            4 => Mode::Silent,
            5 => Mode::GatewayTimeout,
            _ => Mode::Ok,
        }
    }
}

#[derive(Default)]
struct Counters {
    /// Requests received, by method.
    by_method: HashMap<String, u64>,
    /// 503s answered.
    unavailable: u64,
    /// Requests that were churn-guard's probes (`:authority` churn-guard-probe).
    probes: u64,
}

struct Shared {
    name: String,
    mode: AtomicU8,
    /// Requests answered in `UnavailableEveryOther`, to alternate.
    served: std::sync::atomic::AtomicU64,
    counters: Mutex<Counters>,
    body: Option<Bytes>,
}

/// One upstream server. Dropping it kills it.
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    listening: Option<Listening>,
}

impl Upstream {
    /// Starts an upstream on a free loopback port.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_at(name, "127.0.0.1:0".parse()?, None).await
    }

    /// Starts an upstream that serves `body` for every request (used to serve the Wasm module).
    pub async fn serving(name: &str, body: Vec<u8>) -> anyhow::Result<Self> {
        Self::start_at(name, "127.0.0.1:0".parse()?, Some(Bytes::from(body))).await
    }

    /// Starts an upstream on a given address (port 0 picks one), e.g. one that refused
    /// connections until now, or a pod's own loopback IP.
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_at(name, addr, None).await
    }

    async fn start_at(name: &str, addr: SocketAddr, body: Option<Bytes>) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            mode: AtomicU8::new(Mode::Ok as u8),
            served: std::sync::atomic::AtomicU64::new(0),
            counters: Mutex::new(Counters::default()),
            body,
        });
        let mut up = Self { addr, shared, listening: None };
        up.listen().await?;
        Ok(up)
    }

    async fn listen(&mut self) -> anyhow::Result<()> {
        // A pod coming back where a refusing address was (`refusing_addr`) takes its port.
        if let Ok(mut reserved) = RESERVED.lock() {
            reserved.retain(|s| s.local_addr().ok() != Some(self.addr));
        }
        let listener = TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        let shared = Arc::clone(&self.shared);
        self.listening = Some(Listening::start(listener, move |stream, rx| {
            let shared = Arc::clone(&shared);
            async move {
                let svc = service_fn(move |req| handle(Arc::clone(&shared), req));
                let conn = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                follow(conn, rx, |c| c.graceful_shutdown()).await;
            }
        }));
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// The process is gone: the port refuses connections, open ones are closed at once.
    pub fn kill_now(&mut self) {
        if let Some(l) = self.listening.as_mut() {
            l.kill_now();
        }
    }

    /// `kill_now`, then let the connection tasks see it.
    pub async fn kill(&mut self) {
        self.kill_now();
        tokio::task::yield_now().await;
    }

    /// SIGTERM handled well: stop accepting, finish requests in flight, close keep-alive
    /// connections as they go idle.
    pub fn drain(&mut self) {
        if let Some(l) = self.listening.as_mut() {
            l.drain();
        }
    }

    /// Listens again on the same address.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.listen().await
    }

    pub fn hits(&self) -> u64 {
        self.shared.counters.lock().map(|c| c.by_method.values().sum()).unwrap_or(0)
    }

    pub fn hits_for(&self, method: &str) -> u64 {
        self.shared.counters.lock().map(|c| c.by_method.get(method).copied().unwrap_or(0)).unwrap_or(0)
    }

    /// Requests received that were churn-guard's probes; `hits` counts them too.
    pub fn probe_hits(&self) -> u64 {
        self.shared.counters.lock().map(|c| c.probes).unwrap_or(0)
    }

    /// 503s this upstream answered.
    pub fn unavailable_answers(&self) -> u64 {
        self.shared.counters.lock().map(|c| c.unavailable).unwrap_or(0)
    }
}

/// Sockets bound and never listening, kept for the life of the test process.
static RESERVED: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());

/// Returns a loopback address nothing listens on: connections to it are refused. The port stays
/// bound (without listening, and without `SO_REUSEADDR`), so an upstream that another test starts
/// meanwhile cannot be given it and turn "refused" into answers.
pub async fn refusing_addr() -> anyhow::Result<SocketAddr> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let addr = socket.local_addr()?;
    RESERVED.lock().map_err(|_| anyhow::anyhow!("reserved ports poisoned"))?.push(socket);
    Ok(addr)
}

#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for Dropped {}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
    let method = req.method().to_string();
    let probe = req.headers().get(hyper::header::HOST).is_some_and(|h| h == "churn-guard-probe");
    // Read the whole request first: "reached the upstream" means the upstream has it.
    let _ = req.into_body().collect().await;
    if let Ok(mut c) = shared.counters.lock() {
        *c.by_method.entry(method).or_insert(0) += 1;
        c.probes += u64::from(probe);
    }
    let response = |status: StatusCode, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            "x-upstream",
            hyper::header::HeaderValue::from_str(&shared.name).unwrap_or(hyper::header::HeaderValue::from_static("?")),
        );
        r
    };
    let mode = match Mode::from_u8(shared.mode.load(Ordering::SeqCst)) {
        Mode::UnavailableEveryOther if !probe && shared.served.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) => {
            Mode::Unavailable
        }
        Mode::UnavailableEveryOther => Mode::Ok,
        mode => mode,
    };
    if mode == Mode::Unavailable {
        if let Ok(mut c) = shared.counters.lock() {
            c.unavailable += 1;
        }
    }
    match mode {
        Mode::UnavailableEveryOther | Mode::Ok => {
            Ok(response(StatusCode::OK, shared.body.clone().unwrap_or_else(|| Bytes::from(shared.name.clone()))))
        }
        Mode::Unavailable => Ok(response(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"shutting down"))),
        Mode::GatewayTimeout => Ok(response(StatusCode::GATEWAY_TIMEOUT, Bytes::from_static(b"backend timed out"))),
        // hyper closes the connection when the service fails.
        Mode::ResetAfterRequest => Err(Dropped),
        Mode::Silent => std::future::pending().await,
    }
}

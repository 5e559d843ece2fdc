//! How a "pod" lives and dies, whatever it serves: its accept loop, and what its open
//! connections do when it drains (SIGTERM handled well) or is killed (the process is gone).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What open connections should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Serving,
    /// Finish what is in flight, then close.
    Draining,
    /// Close now.
    Killed,
}

/// A server's accept task and the signal its connections follow. Dropping it kills the server.
pub struct Listening {
    lifecycle: watch::Sender<Lifecycle>,
    accept: Option<JoinHandle<()>>,
}

impl Listening {
    /// Accepts on `listener`, handing each connection (with no delay set) to `serve`, which
    /// should pass the connection to [`follow`].
    pub fn start<F, Fut>(listener: TcpListener, serve: F) -> Self
    where
        F: Fn(TcpStream, watch::Receiver<Lifecycle>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (lifecycle, rx) = watch::channel(Lifecycle::Serving);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, rx.clone()));
            }
        });
        Self { lifecycle, accept: Some(accept) }
    }

    /// The port answers with `accept` from now on; connections already open close.
    pub fn replace_accept(&mut self, accept: JoinHandle<()>) {
        self.kill_now();
        self.accept = Some(accept);
    }

    fn stop_accepting(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }

    /// The process is gone: the port refuses connections, open ones are closed at once.
    pub fn kill_now(&mut self) {
        self.stop_accepting();
        let _ = self.lifecycle.send(Lifecycle::Killed);
    }

    /// SIGTERM handled well: stop accepting, let open connections finish what is in flight.
    pub fn drain(&mut self) {
        self.stop_accepting();
        let _ = self.lifecycle.send(Lifecycle::Draining);
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// Serves `conn` until it ends or `rx` says otherwise: on drain, `graceful` asks it to finish
/// (it then gets 30 s); on kill, it is dropped, which closes the socket.
pub async fn follow<C: Future>(
    mut conn: Pin<&mut C>,
    mut rx: watch::Receiver<Lifecycle>,
    mut graceful: impl FnMut(Pin<&mut C>),
) {
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = rx.changed() => {
                let state = *rx.borrow();
                if changed.is_err() || state == Lifecycle::Killed {
                    return;
                }
                if state == Lifecycle::Draining {
                    graceful(conn.as_mut());
                    let _ = tokio::time::timeout(Duration::from_secs(30), conn.as_mut()).await;
                    return;
                }
            }
        }
    }
}

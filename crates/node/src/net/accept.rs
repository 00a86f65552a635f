//! One accept loop for the peer's local servers (the control socket and the
//! web UI) and for the streams other peers open to it: every connection or
//! stream runs as its own task, and all of them end when `shutdown`
//! resolves.

use std::future::Future;

use tokio::task::JoinSet;
use tracing::warn;

/// A listener the loop can accept connections from.
pub(crate) trait Listener {
    type Stream: Send + 'static;
    /// Cancel-safe, as tokio's `accept` methods are.
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// The streams other peers open to this one (see
/// [`crate::net::Client::accept_streams`]), with the peer of each.
impl Listener for tokio::sync::Mutex<libp2p_stream::IncomingStreams> {
    type Stream = (libp2p::PeerId, libp2p::Stream);
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        use futures::StreamExt as _;
        match self.lock().await.next().await {
            Some(incoming) => Ok(incoming),
            // The network has stopped: nothing more comes, and the
            // shutdown that ends the loop follows.
            None => std::future::pending().await,
        }
    }
}

/// Run `handle` on each connection until `shutdown`, then stop them all.
pub(crate) async fn serve<L, H, Fut>(
    what: &'static str,
    listener: L,
    handle: H,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener,
    H: Fn(L::Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            next = listener.accept_one() => match next {
                Ok(stream) => {
                    conns.spawn(handle(stream));
                }
                Err(e) => warn!("{what} accept: {e}"),
            },
        }
    }
    conns.abort_all();
}

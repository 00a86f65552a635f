//! One accept loop for the peer's local servers (the control socket and the
//! web UI): every connection runs as its own task, and all of them end when
//! `shutdown` resolves.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::task::JoinSet;
use tracing::warn;

/// Connections as a stream, from anything with an `accept` method.
pub(crate) fn incoming<L, S, F, Fut>(
    listener: L,
    accept: F,
) -> BoxStream<'static, std::io::Result<S>>
where
    L: Send + Sync + 'static,
    S: Send + 'static,
    F: Fn(Arc<L>) -> Fut + Send + Sync + Copy + 'static,
    Fut: Future<Output = std::io::Result<S>> + Send,
{
    futures::stream::unfold(Arc::new(listener), move |l| async move {
        let next = accept(l.clone()).await;
        Some((next, l))
    })
    .boxed()
}

/// Run `handle` on each connection until `shutdown`, then stop them all.
pub(crate) async fn serve<S, H, Fut>(
    what: &'static str,
    mut connections: BoxStream<'static, std::io::Result<S>>,
    handle: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(S) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            next = connections.next() => match next {
                Some(Ok(stream)) => {
                    conns.spawn(handle(stream));
                }
                Some(Err(e)) => warn!("{what} accept: {e}"),
                None => break,
            },
        }
    }
    conns.abort_all();
}

//! The local control socket's server: how `antnest submit` and `antnest
//! peers` talk to a peer already running on this machine. A Unix socket;
//! messages ([`antnest_proto::control`]) framed as every antnest message is
//! ([`antnest_proto::frame`]).

use std::path::Path;

use antnest_proto::control::{
    ControlError, ControlReply, ControlRequest, JobReport, read_msg, write_msg,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::compat::TokioAsyncReadCompatExt as _;
use tracing::debug;

use crate::master::SubmitError;
use crate::state::Peer;

/// Bind the control socket, replacing a stale one (no peer answers on it).
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("a peer already runs on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    // Only this user may talk to its peer (connections are checked too).
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Whether the process at the other end of `stream` runs as this user.
fn same_user(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    stream.peer_cred().is_ok_and(|c| c.uid() == me)
}

/// Serve control connections until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    peer: Peer,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handle_one = move |stream| {
        let peer = peer.clone();
        async move {
            if let Err(e) = handle(stream, peer).await {
                debug!("control connection: {e}");
            }
        }
    };
    crate::net::accept::serve("control", listener, handle_one, shutdown).await;
}

async fn handle(stream: UnixStream, peer: Peer) -> Result<(), ControlError> {
    if !same_user(&stream) {
        debug!("control connection from another user refused");
        return Ok(());
    }
    let mut stream = stream.compat();
    let Some(request) = read_msg::<ControlRequest, _>(&mut stream).await? else {
        return Ok(());
    };
    match request {
        ControlRequest::Peers => {
            let reply = ControlReply::Peers {
                local: peer.peer_id().to_string(),
                peers: peer.peers().await,
            };
            write_msg(&mut stream, &reply).await
        }
        ControlRequest::Jobs => write_msg(&mut stream, &ControlReply::Jobs(peer.jobs())).await,
        ControlRequest::Cancel(job) => {
            write_msg(&mut stream, &ControlReply::Cancelled(peer.cancel(job))).await
        }
        ControlRequest::Submit(spec) => {
            let (tx, mut rx) = mpsc::channel(8);
            let job = peer.submit(*spec, Some(tx));
            tokio::pin!(job);
            let result = loop {
                tokio::select! {
                    res = &mut job => break res,
                    Some(event) = rx.recv() => {
                        write_msg(&mut stream, &ControlReply::Event(event)).await?;
                    }
                }
            };
            let reply = match result {
                Err(SubmitError::ModuleNotHere(_)) => ControlReply::NeedModule,
                result => reply_for(result),
            };
            write_msg(&mut stream, &reply).await
        }
    }
}

/// The reply that ends a submission.
pub fn reply_for(result: Result<JobReport, SubmitError>) -> ControlReply {
    match result {
        Ok(report) => ControlReply::Done(Box::new(report)),
        Err(e) => {
            let report = match &e {
                SubmitError::TasksFailed { report, .. } => Some(report.clone()),
                _ => None,
            };
            ControlReply::Failed {
                error: e.to_string(),
                report,
            }
        }
    }
}

//! The local control socket: how `antnest submit` and `antnest peers` talk
//! to a peer already running on this machine. A Unix socket; each message
//! is a 4-byte big-endian length and a CBOR body.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::debug;

use crate::network::PeerInfo;
use crate::peer::{JobEvent, JobInfo, JobReport, JobSpec, Peer, SubmitError};
use crate::wire::JobId;

/// Largest control message (a module plus an inline input, or a result).
const MAX_FRAME: usize = 1 << 30;

#[derive(Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    Submit(Box<JobSpec>),
    Peers,
    Jobs,
    Cancel(JobId),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReply {
    /// While a submitted job runs: its id, progress, streamed results.
    Event(JobEvent),
    Jobs(Vec<JobInfo>),
    /// Whether there was such a job to cancel.
    Cancelled(bool),
    Done(Box<JobReport>),
    Failed {
        error: String,
        report: Option<Box<JobReport>>,
    },
    Peers {
        local: String,
        peers: Vec<PeerInfo>,
    },
    /// A submission by module hash, of a module this peer does not have:
    /// submit again with the module's bytes.
    NeedModule,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("control message of {0} bytes is too large")]
    TooLarge(usize),
}

/// The default control socket: `$ANTNEST_CONTROL`, else
/// `$XDG_RUNTIME_DIR/antnest.sock`, else `/tmp/antnest-<user>.sock`.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("ANTNEST_CONTROL") {
        return p.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("antnest.sock");
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    PathBuf::from(format!("/tmp/antnest-{user}.sock"))
}

pub async fn write_msg<T: Serialize>(s: &mut UnixStream, msg: &T) -> Result<(), ControlError> {
    let mut body = Vec::new();
    ciborium::into_writer(msg, &mut body).map_err(|e| ControlError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(ControlError::TooLarge(body.len()));
    }
    s.write_all(&(body.len() as u32).to_be_bytes()).await?;
    s.write_all(&body).await?;
    s.flush().await?;
    Ok(())
}

/// Read one message; `None` on a clean end of stream.
pub async fn read_msg<T: DeserializeOwned>(s: &mut UnixStream) -> Result<Option<T>, ControlError> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ControlError::TooLarge(len));
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    ciborium::from_reader(body.as_slice())
        .map(Some)
        .map_err(|e| ControlError::Malformed(e.to_string()))
}

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
    UnixListener::bind(path)
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
    crate::accept::serve("control", listener, handle_one, shutdown).await;
}

async fn handle(mut stream: UnixStream, peer: Peer) -> Result<(), ControlError> {
    let Some(request) = read_msg::<ControlRequest>(&mut stream).await? else {
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

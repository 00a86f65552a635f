//! The words of antnest: what peers say to each other and what the local
//! tools say to a peer. Plain data and its encoding; no networking, no
//! sandbox, no scheduling, so every other crate can depend on it.
//!
//! - [`ids`]: a module's hash, a job's id, a peer's id.
//! - [`limits`]: per-call limits, the errors a call ends in, message sizes.
//! - [`msg`]: announcements, requests and responses between peers.
//! - [`frame`]: the one encoding (CBOR) and framing of every message.
//! - [`control`]: the control socket's messages and job reports.

pub mod control;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod msg;
#[cfg(any(test, feature = "samples"))]
pub mod samples;

/// Write `bytes` to `path` through a fresh temporary file in the same
/// directory, renamed into place: a reader sees the old file or the whole
/// new one, and two writers (threads, or processes sharing a cache
/// directory) never rename each other's half-written file. Every file
/// antnest writes for later (modules, artifacts, journals, built jobs)
/// goes through this.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

pub use ids::{JobId, ModuleHash, PeerId};
pub use limits::{Limits, TaskError};
pub use msg::{Announce, ByteBuf, Request, Response, Runtime, SharedBytes, TaskOutcome, TaskUnit};

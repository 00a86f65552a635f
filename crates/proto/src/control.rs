//! What `antnest submit`, `antnest jobs` and the web view say to a peer on
//! the same machine: the control socket's messages (framed by
//! [`crate::frame::write_frame`]) and the job reports they carry.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::frame::{read_frame, write_frame};
use crate::ids::{JobId, ModuleHash};
use crate::limits::Limits;
use crate::msg::ByteBuf;

/// Largest control message (a module plus an inline input, or a result).
pub const MAX_CONTROL_MESSAGE: u64 = 1 << 30;

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
}

/// Send one control message on `io` (a Unix stream, through
/// `tokio_util::compat`).
pub async fn write_msg<M, T>(io: &mut T, msg: &M) -> Result<(), ControlError>
where
    M: Serialize,
    T: futures::AsyncWrite + Unpin + Send,
{
    Ok(write_frame(io, msg).await?)
}

/// Read one control message; `None` on a clean end of stream.
pub async fn read_msg<M, T>(io: &mut T) -> Result<Option<M>, ControlError>
where
    M: serde::de::DeserializeOwned,
    T: futures::AsyncRead + Unpin + Send,
{
    read_frame(io, MAX_CONTROL_MESSAGE)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::Unsupported => {
                ControlError::Malformed(e.to_string())
            }
            _ => ControlError::Io(e),
        })
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

/// Where a job's input comes from. Re-openable, so the default split can
/// read it after the job's own split declined.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum InputSpec {
    Path(PathBuf),
    Bytes(ByteBuf),
}

/// A job as submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    /// The module's bytes; empty when `module_hash` names a module the
    /// peer may have already (it answers `ModuleNotHere` if
    /// not, and the submitter sends the bytes).
    pub module: ByteBuf,
    #[serde(default)]
    pub module_hash: Option<ModuleHash>,
    pub input: InputSpec,
    /// Tighter limits than the peer's, if wanted.
    pub limits: Option<Limits>,
    /// Attempts per taskunit before it counts as failed.
    pub max_attempts: u32,
    /// Combine the successful results even if some taskunits failed.
    pub keep_going: bool,
    /// Continue this earlier job from its journal (same module and input).
    pub resume: Option<JobId>,
    /// Run each taskunit on this many distinct peers and compare results.
    pub replicate: u8,
    /// Send each result to the submitter as it arrives.
    pub stream: bool,
    /// Where a Python job's taskunits may run.
    #[serde(default)]
    pub runtime: crate::msg::Runtime,
    /// The share (0 to 1) of remote workers' results run again on the
    /// master's own slots (`--verify`); `None`: the master's default.
    #[serde(default)]
    pub verify: Option<f64>,
    /// The job's share of each worker's slots against other jobs' (1 by
    /// default): slot time goes to the jobs a worker knows in proportion.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Figures about a finished job (`--stats-json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobStats {
    pub job_id: String,
    pub module: String,
    pub tasks: u64,
    pub failed: u64,
    pub wall_ms: u64,
    /// Taskunits completed by each peer (by peer id).
    pub per_peer: std::collections::BTreeMap<String, u64>,
    /// Components compiled by the master for this job (0 on a cache hit).
    pub compiled: u64,
    /// Results taken from the journal of an earlier run (`--resume`).
    pub resumed: u64,
    /// Taskunits whose replicas disagreed and were run again (`--replicate`).
    pub mismatches: u64,
    /// Taskunits slower workers gave back unstarted, for a faster one.
    #[serde(default)]
    pub taken_back: u64,
    /// Results and errors dropped because the peer that handed them in
    /// had not been given that taskunit, by peer id.
    #[serde(default)]
    pub unleased: std::collections::BTreeMap<String, u64>,
    /// Spot checks (`--verify`) that found a worker's result right.
    #[serde(default)]
    pub verified: u64,
    /// Workers caught with a wrong result by a spot check, by peer id: they
    /// are refused, and their results were run again.
    #[serde(default)]
    pub caught: std::collections::BTreeMap<String, u64>,
    /// Spot checks stopped because the job's results vary between runs
    /// (random numbers, clocks): nothing to hold a worker's result against.
    #[serde(default)]
    pub verify_stopped: bool,
    /// Backup copies handed out of taskunits a late worker held (first
    /// result wins): a worker holding taskunits and not answering shows
    /// here.
    #[serde(default)]
    pub backups: u64,
    /// Taskunits run by native CPython (see `Runtime`); the others ran
    /// in wasm (or came from the journal).
    #[serde(default)]
    pub native_tasks: u64,
    /// The job's combine ran in the master's own CPython (a Python job
    /// whose taskunits may run natively there), not in wasm.
    #[serde(default)]
    pub combined_natively: bool,
    /// From submission to the first taskunit result, in milliseconds.
    pub first_result_ms: Option<f64>,
    /// Whether the submitter sent the module's bytes (not when the peer
    /// had them already and the hash was enough).
    #[serde(default)]
    pub module_sent: bool,
    /// How each worker still connected at the end was reached: "direct",
    /// "relay", or "relay, then direct" (after hole punching).
    #[serde(default)]
    pub reached: std::collections::BTreeMap<String, String>,
}

/// What a finished job gives back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobReport {
    pub output: ByteBuf,
    pub stats: JobStats,
    /// Taskunits that failed every attempt (only with `keep_going`).
    pub failures: Vec<(u64, String)>,
}

/// What a submitter hears while its job runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobEvent {
    /// The job has an id (sent first).
    Started(JobId),
    /// Where it starts (sent second): whether its master compiled the
    /// module for it (else it was cached), the peers connected to the
    /// master, and the master's own worker slots.
    Setup {
        compiled: bool,
        peers: u64,
        slots: u64,
    },
    Progress(Progress),
    /// What a taskunit wrote to stderr, wherever it ran.
    Log {
        index: u64,
        text: String,
    },
    /// One taskunit's result as it arrives (with [`JobSpec::stream`]).
    Result {
        index: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// A job that has ended, for the web view's list of the last ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FinishedJob {
    pub job_id: String,
    pub module: String,
    /// "done", "failed" or "cancelled".
    pub outcome: String,
    pub wall_ms: u64,
    pub tasks: u64,
    pub failed: u64,
    /// Results by worker peer id.
    pub per_peer: std::collections::BTreeMap<String, u64>,
    /// The first few taskunits that failed, with their errors.
    pub failures: Vec<(u64, String)>,
    /// The start of what its taskunits wrote to stderr, wherever they ran
    /// (`taskunit N: ` before each line).
    #[serde(default)]
    pub stderr: String,
}

/// A running job, for `antnest jobs` and the web view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobInfo {
    pub job_id: String,
    pub module: String,
    pub progress: Progress,
    pub running_ms: u64,
    /// Results so far by worker peer id.
    pub per_peer: std::collections::BTreeMap<String, u64>,
    /// Each worker of the job by peer id: what it holds now and its pace.
    #[serde(default)]
    pub workers: std::collections::BTreeMap<String, WorkerInfo>,
    /// `progress.fraction()` and `progress.total_estimate()`, for readers
    /// of the JSON (the web page).
    #[serde(default)]
    pub fraction: Option<f64>,
    #[serde(default)]
    pub total_estimate: Option<u64>,
}

/// A worker of a running job, as its master sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Taskunits it holds (leased, not yet handed in).
    pub held: u64,
    /// Its recent compute time per taskunit, in milliseconds.
    pub pace_ms: Option<f64>,
    /// "working" (it holds taskunits), "idle", or "getting the module" (it
    /// asked for the job's module and has taken no taskunit since:
    /// fetching or compiling it).
    #[serde(default)]
    pub state: String,
}

/// Progress figures, for the submitter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub failed: u64,
    /// Known once the split has finished.
    pub total: Option<u64>,
    pub leased: u64,
    /// Distinct workers holding leases right now.
    pub workers: u64,
    /// Taskunits whose replicas disagreed (and were run again).
    pub mismatches: u64,
    /// Taskunits slower workers gave back unstarted (see
    /// the scheduler's `JobBook::give_back`).
    #[serde(default)]
    pub taken_back: u64,
    /// Taskunits the split has made so far.
    #[serde(default)]
    pub made: u64,
    /// Bytes of the input the split has gone through so far, and the
    /// input's size if it is known: while the split runs, they tell how far
    /// the job is.
    #[serde(default)]
    pub input_bytes: u64,
    #[serde(default)]
    pub input_size: Option<u64>,
}

impl Progress {
    /// How far the job is, from 0 to 1, if that can be told: taskunits
    /// ended out of the total once the split has ended; before, out of the
    /// total that the share of the input split so far points to (never
    /// 1 before the split ends).
    pub fn fraction(&self) -> Option<f64> {
        let ended = (self.done + self.failed) as f64;
        if let Some(total) = self.total {
            return Some(if total == 0 {
                1.0
            } else {
                (ended / total as f64).min(1.0)
            });
        }
        let size = self.input_size.filter(|s| *s > 0)? as f64;
        let split = (self.input_bytes as f64 / size).min(1.0);
        if split <= 0.0 || self.made == 0 {
            return Some(0.0);
        }
        Some((ended * split / self.made as f64).min(0.99))
    }

    /// Seconds left, from how far the job is after `elapsed` seconds.
    pub fn eta_secs(&self, elapsed: f64) -> Option<f64> {
        self.fraction()
            .filter(|f| *f > 0.0)
            .map(|f| elapsed * (1.0 - f) / f)
    }

    /// The total number of taskunits: known once the split has ended, else
    /// estimated from the share of the input split so far.
    pub fn total_estimate(&self) -> Option<u64> {
        if self.total.is_some() {
            return self.total;
        }
        let size = self.input_size.filter(|s| *s > 0)? as f64;
        let split = self.input_bytes as f64 / size;
        (split > 0.0 && self.made > 0).then(|| (self.made as f64 / split.min(1.0)).round() as u64)
    }
}

/// A peer as the local peer sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub addresses: Vec<String>,
    pub connected: bool,
    pub agent: Option<String>,
    /// How it was reached, while connected: "direct", "relay", or "relay,
    /// then direct" (after hole punching).
    #[serde(default)]
    pub via: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn progress_is_told_from_the_input_until_the_split_ends() {
        // A quarter of a 1000-byte input split into 100 taskunits, 50 done:
        // about 400 in all, an eighth done.
        let mut p = Progress {
            done: 50,
            made: 100,
            input_bytes: 250,
            input_size: Some(1000),
            ..Progress::default()
        };
        assert_eq!(p.total_estimate(), Some(400));
        assert_eq!(p.fraction(), Some(0.125));
        // An eighth in 10 s: 70 s to go.
        assert_eq!(p.eta_secs(10.0), Some(70.0));
        // All of it split, all done: still under 1 until the split ends.
        p.done = 400;
        p.made = 400;
        p.input_bytes = 1000;
        assert_eq!(p.fraction(), Some(0.99));
        p.total = Some(400);
        assert_eq!(p.fraction(), Some(1.0));
        // A stream of unknown size: no fraction to tell.
        let stream = Progress {
            done: 5,
            made: 9,
            input_bytes: 77,
            ..Progress::default()
        };
        assert_eq!(stream.fraction(), None);
        assert_eq!(stream.eta_secs(10.0), None);
        assert_eq!(stream.total_estimate(), None);
    }
}

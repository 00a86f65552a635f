//! What bounds a job: per-call limits a master asks for and a worker
//! allows, the errors a call can end in, and the sizes of messages.

use std::time::Duration;

/// Largest request (a batch of results) in bytes.
pub const MAX_REQUEST: u64 = 64 << 20;
/// Largest response (a batch of taskunits, or a module) in bytes.
pub const MAX_RESPONSE: u64 = 128 << 20;
/// A batch of taskunits handed to another peer stops growing at this many
/// bytes (a slot of the master's own peer is not capped). Small enough that
/// a batch of data-heavy taskunits crosses the network in a few
/// milliseconds and its buffers come from the heap instead of fresh
/// mappings (measured in `examples/speed-log.md`).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Largest single taskunit.
pub const MAX_TASKUNIT: usize = 16 << 20;
/// Largest module a peer will fetch or accept.
pub const MAX_MODULE: usize = 100 << 20;

/// Largest weight of a job (`antnest submit --weight`); a worker takes an
/// announced weight only up to this.
pub const MAX_WEIGHT: u32 = 1000;

/// Limits applied to every guest call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Compute time allowed for one call (one taskunit, or the whole split or combine).
    pub time: Duration,
    /// Linear memory a guest instance may grow to, in bytes.
    pub memory: usize,
    /// Largest result of one taskunit, in bytes (and of the combined output, times 64).
    pub output: usize,
    /// Each taskunit in a fresh instance whose WASI random numbers are
    /// seeded from the taskunit and whose clocks are the same on every
    /// peer (`antnest submit --deterministic`): a taskunit gives the same
    /// bytes wherever and however often it runs, so replicas and spot
    /// checks can compare jobs that draw random numbers or read the time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deterministic: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: Duration::from_secs(60),
            memory: 512 << 20,
            output: 8 << 20,
            deterministic: false,
        }
    }
}

impl Limits {
    /// The tighter of two sets of limits: a job may ask for less than a peer allows, never more.
    pub fn min(self, other: Limits) -> Limits {
        Limits {
            time: self.time.min(other.time),
            memory: self.memory.min(other.memory),
            output: self.output.min(other.output),
            // The job's wish: no peer's own limits turn it off.
            deterministic: self.deterministic || other.deterministic,
        }
    }

    pub fn combined_output(&self) -> usize {
        self.output.saturating_mul(64)
    }
}

/// Why one guest call failed. Every variant is a per-task error, never a crash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum TaskError {
    #[error("timed out: used more than {0:?} of compute time")]
    Timeout(Duration),
    #[error("out of memory: the guest tried to grow past the {0}-byte limit")]
    OutOfMemory(usize),
    #[error("output too large: {size} bytes, limit {limit}")]
    OutputTooLarge { size: usize, limit: usize },
    #[error("trap: {0}")]
    Trap(String),
    #[error("job error: {0}")]
    Guest(String),
    #[error("cannot run: {0}")]
    Load(String),
    #[error("the {0} replicas of this taskunit gave different results")]
    Mismatch(usize),
    /// The worker could not run it now (not the job's fault): another
    /// peer, or this one later, may.
    #[error("worker busy: {0}")]
    Busy(String),
}

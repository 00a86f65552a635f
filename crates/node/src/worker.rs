//! The worker side of every peer: one loop per slot finds a batch (from
//! the job, its own peer's or another's, furthest behind its share), runs it on the
//! slot's own thread with a reused sandbox instance, and hands the results
//! in with the pull for the next batch.
//!
//! - [`slot`]: the slot loop.
//! - [`pull`]: pulls, results and long polls to a master; module fetch.
//! - [`batch`]: a batch and where it came from; running its taskunits.
//! - [`runner`]: what runs a taskunit: wasm, or native Python.
//! - [`remote_batch`]: a remote batch a master may take back from.
//! - [`known`]: what the slots know of other peers' jobs.
//! - [`share`]: how the slots share their time between jobs.
//! - [`thread`]: the OS thread of a slot.

pub mod batch;
pub mod known;
pub mod pull;
pub mod remote_batch;
pub mod runner;
pub mod share;
pub mod slot;
pub mod thread;

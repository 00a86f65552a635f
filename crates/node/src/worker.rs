//! The worker side of every peer: one loop per slot finds a batch (its own
//! peer's jobs first, then jobs announced by others), runs it on the
//! slot's own thread with a reused sandbox instance, and hands the results
//! in with the pull for the next batch.
//!
//! - [`slot`]: the slot loop.
//! - [`pull`]: pulls, results and long polls to a master; module fetch.
//! - [`batch`]: a batch and where it came from; running its taskunits.
//! - [`runner`]: what runs a taskunit: wasm, or native Python.
//! - [`remote_batch`]: a remote batch a master may take back from.
//! - [`known`]: what the slots know of other peers' jobs.
//! - [`thread`]: the OS thread of a slot.

pub mod batch;
pub mod known;
pub mod pull;
pub mod remote_batch;
pub mod runner;
pub mod slot;
pub mod thread;

//! The wasm sandbox: compiles job components (once, cached by content
//! hash) and runs `split`, `process` and `combine` under a time limit, a
//! memory limit and an output size limit, with no filesystem, network or
//! environment. Everything here is synchronous: a call blocks its thread.
//!
//! - [`engine`]: [`Environment`], one per peer: the engine, the component
//!   cache, instantiation and the epoch ticker behind deadlines.
//! - [`guest`] (private): the host interface a guest calls, WASI, limits.
//! - [`run`]: [`TaskRunner`] for taskunits; [`run_split`], [`run_combine`].
//! - [`lines`]: the line splitter (the default split, `host.emit-lines`).
//! - [`input`]: a job's input opened for its split; [`mapped`]: files
//!   mapped into memory, with a flag for a file changed meanwhile.

pub mod engine;
mod guest;
pub mod input;
pub mod lines;
pub mod mapped;
pub mod run;

pub use engine::{CacheStats, Environment, LoadError, TICK_MAX, TICK_MIN};
pub use input::SplitInput;
pub use run::{SplitOutcome, TaskRunner, default_combine, run_combine, run_split};
pub use wasmtime::component::Component;

/// Write `bytes` to `path` through a fresh temporary file in the same
/// directory, renamed into place: a reader sees the old file or the whole
/// new one, and two writers (threads, or processes sharing a cache
/// directory) never rename each other's half-written file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

//! The wasm sandbox: compiles job components (once, cached by content
//! hash) and runs `split`, `process` and `combine` under a time limit, a
//! memory limit and an output size limit, with no filesystem, network or
//! environment. Everything here is synchronous: a call blocks its thread.
//!
//! - [`engine`]: [`Sandbox`], one per peer: the engine, the component
//!   cache, instantiation and the epoch ticker behind deadlines.
//! - [`compile`]: compiling in a child process, bounded in time and memory.
//! - [`guest`] (private): the host interface a guest calls, WASI, limits.
//! - [`run`]: [`TaskRunner`] for taskunits; [`run_split`], [`run_combine`];
//!   [`Renderer`] for streamed results.
//! - [`job_files`]: a job's files carried beside an interpreter (antnest's
//!   Python runner), compiled once for every job that shares it.
//! - [`python`]: antnest's Python, shared by the wasm runner and
//!   [`native`], the opt-in native CPython runtime (under bubblewrap).
//! - [`lines`]: the line splitter (the default split, `host.emit-lines`).
//! - [`input`]: a job's input opened for its split; [`mapped`]: files
//!   mapped into memory, with a flag for a file changed meanwhile.

pub mod compile;
pub mod engine;
mod guest;
pub mod input;
pub mod job_files;
pub mod lines;
pub mod mapped;
pub mod native;
pub mod python;
pub mod run;

pub use compile::Compiler;
pub use engine::{CacheStats, LoadError, Module, Sandbox, TICK_MAX, TICK_MIN};
pub use input::SplitInput;
pub use native::{NativeError, NativePython, NativeRunner};
pub use run::{Renderer, SplitOutcome, TaskRunner, default_combine, run_combine, run_split};

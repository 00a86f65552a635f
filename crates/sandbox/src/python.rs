//! antnest's Python, as text: what a Python job's calls do
//! ([`JOB`], shared by both runtimes), the wasm runner's glue around it
//! ([`RUNNER`], built into a component once per machine by the submitter),
//! and the native runtime's loop ([`NATIVE`], see [`crate::native`]).

/// `antnest_job.py`: a Python job's split, process and combine.
pub const JOB: &str = include_str!("../python/antnest_job.py");
/// `antnest_runner.py`: the wasm runner's module (imports `antnest_job`).
pub const RUNNER: &str = include_str!("../python/antnest_runner.py");
/// `antnest_native.py`: run after [`JOB`]'s text in a native process.
pub const NATIVE: &str = include_str!("../python/antnest_native.py");

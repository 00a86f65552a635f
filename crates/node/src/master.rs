//! The master of a job: the peer it was submitted to. It compiles the
//! module, runs the split into the job's book (`antnest-sched`), answers
//! workers' pulls and results, asks slower workers to give back what they
//! have not started, combines, and reports to the submitter.
//!
//! - [`submit`]: a job from start to report.
//! - [`serve`]: answering workers (task streams, requests, long polls).
//! - [`split`]: the split feeding the book, the results feeding the combine.
//! - [`job`]: the record of a job being mastered.
//! - [`stream`]: results as text for a submitter watching them come.

pub mod job;
pub mod serve;
pub mod split;
pub(crate) mod stream;
pub mod submit;

pub use submit::SubmitError;

//! How a master schedules one job: pure and synchronous, with no
//! networking and no sandbox, so its rules can be read, changed and tested
//! on their own (`cargo test -p antnest-sched`).
//!
//! - [`book`]: [`JobBook`], the record of one job: taskunits from the
//!   split, leases and their expiry, results, give-back; `book/policy.rs`
//!   holds the rules for what to hand out (shares, the end game, backups),
//!   `book/replicas.rs` the replicas' votes.
//! - [`intake`]: the bounded queue from a job's split into its book.
//! - [`pace`]: how fast each worker is, remembered across jobs.
//! - [`journal`]: results on disk as they arrive, for `--resume`.

pub mod book;
pub mod intake;
pub mod journal;
pub mod pace;

pub use book::{Finished, JobBook, Progress};
pub use intake::{SplitClosed, SplitReceiver, SplitSender, split_channel};
pub use journal::{JOURNAL_AFTER, Journal, JournalError};
pub use pace::{Pace, WorkerTimes};

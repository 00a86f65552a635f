//! A job this peer is master of ([`MasterJob`]), and the records of all
//! of them ([`Masters`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use antnest_proto::control::FinishedJob;
use antnest_proto::{JobId, Limits, ModuleHash, PeerId, Runtime};
use antnest_sched::{JobBook, Journal, WorkerTimes};
use tokio::sync::Notify;
use tracing::warn;

/// A master passes accepted results to the job's combine once this many
/// bytes, or this many results, are waiting (and at the job's end).
pub(crate) const FEED_BYTES: usize = 64 << 10;
pub(crate) const FEED_RESULTS: usize = 1024;

/// Whether `n` results of `bytes` in all are enough to pass to a combine.
pub(crate) fn enough_to_feed(n: usize, bytes: usize) -> bool {
    n >= FEED_RESULTS || bytes >= FEED_BYTES
}

/// A job this peer is master of.
pub(crate) struct MasterJob {
    pub(crate) started: Instant,
    pub(crate) module: ModuleHash,
    /// The module's bytes if the submitter sent them (else they are read
    /// from the disk cache when a worker asks).
    pub(crate) bytes: Option<Arc<Vec<u8>>>,
    pub(crate) module_size: u64,
    /// The hash of its code, for a module with job files (see
    /// `Announce::code`).
    pub(crate) code: Option<ModuleHash>,
    pub(crate) limits: Limits,
    /// Where its Python taskunits may run.
    pub(crate) runtime: Runtime,
    /// Its share of the slots against other jobs' (see `worker::share`).
    pub(crate) weight: u32,
    pub(crate) book: Mutex<JobBook>,
    /// Where accepted results go on disk (see [`MasterJob::record`]).
    pub(crate) journal: Mutex<Option<Journal>>,
    /// Signalled when results arrive (holds a permit if nobody waits yet).
    pub(crate) progress: Notify,
    /// How far the split has gone through the input, and whether the
    /// input file changed meanwhile.
    pub(crate) input: Arc<crate::master::split::InputSplit>,
    /// The split has made a taskunit: the job may be announced (announced
    /// earlier, a worker's first pull finds nothing and it backs off).
    pub(crate) units_made: AtomicBool,
    /// Its submitter takes each result as it comes.
    pub(crate) streams: bool,
}

impl MasterJob {
    /// Change the book with `f` (results handed in), then append the
    /// results it accepted to the journal with the book unlocked: slot
    /// threads take the book for every batch, and journal writes are file
    /// I/O. Records are independent of each other, so two writers may
    /// append theirs in either order.
    pub(crate) fn record<R>(&self, f: impl FnOnce(&mut JobBook) -> R) -> R {
        let (r, records) = {
            let mut book = self.book.lock().unwrap();
            let r = f(&mut book);
            (r, book.take_journal())
        };
        if !records.is_empty() {
            let mut journal = self.journal.lock().unwrap();
            if let Some(j) = journal.as_mut()
                && let Err(e) = j.append(&records).and_then(|()| j.flush())
            {
                warn!("journal write failed, journal dropped: {e}");
                *journal = None;
            }
        }
        r
    }
}

/// The jobs this peer is master of, and what it learned of its workers.
#[derive(Default)]
pub(crate) struct Masters {
    pub(crate) jobs: Mutex<HashMap<JobId, Arc<MasterJob>>>,
    /// Results of this peer's finished jobs by the peer that computed them
    /// (at most [`PER_PEER_KEPT`] peers), for metrics.
    pub(crate) per_peer: Mutex<BTreeMap<PeerId, u64>>,
    /// Peers that asked for a module of this peer's, and when (at most
    /// [`PER_PEER_KEPT`]): shown as getting it until they take taskunits.
    pub(crate) fetching: Mutex<HashMap<PeerId, (ModuleHash, Instant)>>,
    /// Workers caught with a wrong result, refused until then.
    pub(crate) refused: Mutex<HashMap<PeerId, Instant>>,
    /// The last [`FINISHED_KEPT`] jobs that ended, newest last.
    pub(crate) finished: Mutex<std::collections::VecDeque<FinishedJob>>,
    /// What each worker's batches took per taskunit in the last job of each
    /// module this peer was master of (see [`JobBook::with_times`]).
    pub(crate) turnarounds: Mutex<HashMap<ModuleHash, WorkerTimes>>,
}

/// Peers whose results a master counts for its metrics.
pub(crate) const PER_PEER_KEPT: usize = 1024;

/// Finished jobs a master keeps for the web view.
pub(crate) const FINISHED_KEPT: usize = 50;

/// Notes a job as finished when dropped: as failed unless told how it
/// ended (so every way out of a job after it started is noted).
pub(crate) struct Finishing<'a> {
    pub(crate) masters: &'a Masters,
    pub(crate) started: std::time::Instant,
    pub(crate) entry: FinishedJob,
}

/// The most guest stderr a finished job keeps for the web view.
const FINISHED_STDERR: usize = 16 << 10;

impl Finishing<'_> {
    /// Keep what taskunit `index` wrote to stderr, up to [`FINISHED_STDERR`].
    pub(crate) fn note_stderr(&mut self, index: u64, text: &str) {
        let kept = &mut self.entry.stderr;
        for line in text.lines() {
            if kept.len() >= FINISHED_STDERR {
                return;
            }
            let line = format!("taskunit {index}: {line}\n");
            let room = FINISHED_STDERR - kept.len();
            kept.push_str(&line[..line.floor_char_boundary(room)]);
        }
    }

    /// The job ended with `report` (its failures too, if any).
    pub(crate) fn report(&mut self, report: &antnest_proto::control::JobReport, outcome: &str) {
        let s = &report.stats;
        self.entry.outcome = outcome.into();
        self.entry.tasks = s.tasks;
        self.entry.failed = s.failed;
        self.entry.per_peer = s.per_peer.clone();
        self.entry.failures = report.failures.iter().take(10).cloned().collect();
    }
}

impl Drop for Finishing<'_> {
    fn drop(&mut self) {
        let mut entry = std::mem::take(&mut self.entry);
        entry.wall_ms = self.started.elapsed().as_millis() as u64;
        let mut finished = self.masters.finished.lock().unwrap();
        if finished.len() >= FINISHED_KEPT {
            finished.pop_front();
        }
        finished.push_back(entry);
    }
}

/// Results per worker, by the worker's peer id as text (as reports show them).
pub(crate) fn by_name(per_worker: &BTreeMap<PeerId, u64>) -> BTreeMap<String, u64> {
    per_worker
        .iter()
        .map(|(w, n)| (w.to_string(), *n))
        .collect()
}

/// Modules whose workers' figures a master remembers.
pub(crate) const REMEMBERED_MODULES: usize = 64;

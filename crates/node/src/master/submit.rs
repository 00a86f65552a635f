//! A job submitted to this peer, from its start to its report: the module
//! compiled, the book set up (and the journal, or the journal resumed),
//! the split and the combine on threads of their own, announcements,
//! progress for the submitter, and the report.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use antnest_proto::control::{FinishedJob, InputSpec, JobEvent, JobReport, JobSpec, JobStats};
use antnest_proto::limits::{MAX_MODULE, MAX_WEIGHT};
use antnest_proto::{ByteBuf, JobId, ModuleHash, TaskError};
use antnest_sandbox::mapped::Damage;
use antnest_sandbox::{NativePython, NativeRunner};
use antnest_sched::{JobBook, Journal, JournalError, split_channel};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::master::job::{
    Finishing, MasterJob, PER_PEER_KEPT, REMEMBERED_MODULES, by_name, enough_to_feed,
};
use crate::master::split::{InOrder, InputSplit, split_job};
use crate::master::stream::Streamer;
use crate::state::Peer;

/// How far (in bytes of taskunits) a job's split may run ahead of its workers.
pub(crate) const SPLIT_AHEAD_BYTES: usize = 32 << 20;
/// A Python job whose results are expected to come to this many bytes or
/// more has its combine run natively from the start, where it may.
const NATIVE_COMBINE_FROM: u64 = 1 << 20;
/// How many taskunits a job will have: all of them once its split has
/// ended, else those made so far, scaled up by how much of its input
/// (if its size is known) they came from.
fn expected_units(p: &antnest_proto::control::Progress) -> u64 {
    match (p.total, p.input_size) {
        (Some(total), _) => total,
        (None, Some(size)) if p.input_bytes > 0 => {
            (p.made as u128 * size as u128 / p.input_bytes as u128) as u64
        }
        (None, _) => p.made,
    }
}

/// How often a job's loop looks at its book unwoken: for progress reports,
/// announcements, and to nudge idle slots and waiting workers (a lease
/// expired, a straggler to back up).
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    #[error("the job module is not usable: {0}")]
    InvalidModule(String),
    #[error("module is {size} bytes, more than the {max}-byte limit")]
    ModuleTooLarge { size: usize, max: usize },
    #[error("split failed: {0}")]
    Split(String),
    #[error("combine failed: {0}")]
    Combine(String),
    #[error("{failed} of {tasks} taskunits failed; first: taskunit {index}: {error}")]
    TasksFailed {
        tasks: u64,
        failed: u64,
        index: u64,
        error: TaskError,
        report: Box<JobReport>,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("the job was cancelled")]
    Cancelled,
    #[error(
        "a spot check (--verify) caught a worker with a wrong result after {0} of its results had reached the job's combine: the output cannot be trusted; run the job again (that worker is refused now)"
    )]
    WrongResultsPassedOn(u64),
    #[error(
        "the input file changed while the job ran (it was truncated, written or appended to); run the job again"
    )]
    InputChanged,
    #[error("--replicate {need} needs {need} peers, but this peer sees {have} (itself included)")]
    NotEnoughPeers { need: u8, have: usize },
    #[error("this peer already runs {0} jobs, its limit (--max-jobs)")]
    Busy(usize),
    #[error("job {0} is running on this peer: it cannot be resumed while it runs")]
    StillRunning(JobId),
    #[error("this peer does not have module {0}: send its bytes")]
    ModuleNotHere(ModuleHash),
}

impl Peer {
    /// Run a job with this peer as master; returns when it is combined.
    /// `events` receives the job id at once, then progress about every
    /// 100 ms (best effort) and, with `spec.stream`, every result.
    pub async fn submit(
        &self,
        spec: JobSpec,
        events: Option<mpsc::Sender<JobEvent>>,
    ) -> Result<JobReport, SubmitError> {
        let started = Instant::now();
        let module_sent = !spec.module.is_empty();
        let env = self.state.env.clone();
        let (hash, bytes) = match spec.module_hash {
            // By hash: from a job of this module running here, or (below)
            // from the module store (written only after the bytes matched
            // the hash).
            Some(hash) if !module_sent => (hash, self.running_module(hash)),
            _ => {
                let bytes = spec.module.into_vec();
                if bytes.len() > MAX_MODULE {
                    return Err(SubmitError::ModuleTooLarge {
                        size: bytes.len(),
                        max: MAX_MODULE,
                    });
                }
                (ModuleHash::of(&bytes), Some(Arc::new(bytes)))
            }
        };
        let compiled_before = env.cache_stats().compiled;
        // The module's bytes are read from the disk cache only if a worker
        // asks for them (a Python job's are 36 MB): a job by hash needs
        // only that they are there, and their size.
        let module_size = match &bytes {
            Some(b) => b.len() as u64,
            None => {
                let env = env.clone();
                tokio::task::spawn_blocking(move || env.stored_size(&hash))
                    .await
                    .expect("stat task")
                    .ok_or(SubmitError::ModuleNotHere(hash))?
            }
        };
        let component = match env.loaded(&hash) {
            // Compiled already: no blocking thread.
            Some(component) => component,
            None => {
                let (env, bytes) = (env.clone(), bytes.clone());
                tokio::task::spawn_blocking(move || {
                    // No bytes at hand: the component loads from the
                    // artifact cache, or the module from the disk cache.
                    env.component(&hash, || bytes.map(|b| b.as_ref().clone()))
                        .map_err(|e| SubmitError::InvalidModule(e.to_string()))
                })
                .await
                .expect("compile task")?
            }
        };
        let compiled = env.cache_stats().compiled - compiled_before;
        let limits = spec.limits.map_or(self.state.config.limits, |l| {
            l.min(self.state.config.limits)
        });
        {
            let running = self.state.master.jobs.lock().unwrap().len();
            if running >= self.state.config.max_jobs {
                return Err(SubmitError::Busy(running));
            }
        }
        if spec.replicate > 1 {
            let have = 1 + self.peers().await.iter().filter(|p| p.connected).count();
            if have < spec.replicate as usize {
                return Err(SubmitError::NotEnoughPeers {
                    need: spec.replicate,
                    have,
                });
            }
        }
        let (tx, rx) = split_channel(4096, SPLIT_AHEAD_BYTES);
        let known = self
            .state
            .master
            .turnarounds
            .lock()
            .unwrap()
            .get(&hash)
            .cloned();
        let verify = spec.verify.unwrap_or_else(|| {
            // An open mesh (anyone on the LAN may work on it) checks a few
            // results by default.
            let open =
                self.state.config.net.psk.is_none() && self.state.config.allowed_masters.is_none();
            if open { DEFAULT_VERIFY } else { 0.0 }
        });
        let mut book = JobBook::new(rx, self.state.config.lease, spec.max_attempts)
            .with_replicas(spec.replicate)
            .with_times(known.unwrap_or_default())
            .with_checks(verify.clamp(0.0, 1.0), check_key(), self.state.local);
        // Results go to the combine as they are accepted: it runs alongside
        // the job and sees the end of the feed when `feed` is dropped.
        let (feed, feed_rx) = std::sync::mpsc::channel::<Vec<(u64, Vec<u8>)>>();
        let journal_root = self
            .state
            .config
            .cache_dir
            .as_ref()
            .map(|d| d.join("journal"));
        let mut journal = None;
        let id = match (spec.resume, &journal_root) {
            (Some(id), _) if self.master_job(id).is_some() => {
                return Err(SubmitError::StillRunning(id));
            }
            (Some(id), Some(root)) => {
                let (resumed, done) =
                    Journal::resume(root, id, &hash, &input_identity(&spec.input))?;
                info!(job = %id, results = done.len(), "resuming from the journal");
                let _ = feed.send(done.iter().map(|(i, r)| (*i, r.clone())).collect());
                book.set_journal(done);
                journal = Some(resumed);
                id
            }
            (Some(id), None) => return Err(SubmitError::Journal(JournalError::NotFound(id))),
            (None, root) => {
                let id = JobId::random();
                if let Some(root) = root {
                    book.set_journal(Default::default());
                    let input = input_identity(&spec.input);
                    journal = Some(Journal::create(root, id, &hash, &input));
                }
                id
            }
        };
        // From here on the job is noted among the finished ones when it
        // ends, however it does.
        let mut finishing = Finishing {
            masters: &self.state.master,
            started,
            entry: FinishedJob {
                job_id: id.to_string(),
                module: hash.to_string(),
                outcome: "failed".into(),
                ..FinishedJob::default()
            },
        };
        if let Some(events) = &events {
            let _ = events.send(JobEvent::Started(id)).await;
            let peers = self.peers().await.iter().filter(|p| p.connected).count();
            let setup = JobEvent::Setup {
                compiled: compiled > 0,
                peers: peers as u64,
                slots: self.state.config.slots as u64,
            };
            let _ = events.send(setup).await;
        }
        let master = Arc::new(MasterJob {
            started,
            module: hash,
            bytes,
            module_size,
            code: component.code(),
            limits,
            // Native CPython's random numbers and clocks are its own: a
            // deterministic job runs in wasm everywhere.
            runtime: if limits.deterministic {
                antnest_proto::Runtime::Wasm
            } else {
                spec.runtime
            },
            weight: spec.weight.clamp(1, MAX_WEIGHT),
            book: Mutex::new(book),
            journal: Mutex::new(journal),
            progress: Notify::new(),
            input: Arc::new(InputSplit::of(&spec.input)),
            units_made: std::sync::atomic::AtomicBool::new(false),
            streams: spec.stream && events.is_some(),
        });
        self.state
            .master
            .jobs
            .lock()
            .unwrap()
            .insert(id, master.clone());
        // A slot going on with another job leaves it for this one's share.
        self.state.worker.shares.join(id, master.weight);
        info!(job = %id, module = %hash, "job submitted");

        // Combine on a blocking thread while the job runs: it reads each
        // result as soon as it and all before it are in, so only the last
        // few are left to merge when the last taskunit finishes. `None`: the
        // job asked for the default combine (done below over all results).
        // Started when there are results to pass it, or nothing is left to
        // hand out (a slot of this peer is about to be free), not with the
        // split: at a job's start the cores are busy enough.
        // A Python job whose taskunits may run natively here may have its
        // split and combine run in this peer's own CPython too: the split
        // if wasm cannot import the job (see `split_job`), the combine (if
        // it has one) as follows. A native combine costs a process start
        // (tens of ms of a core, while taskunits still run) and decodes and
        // merges big results several times faster than wasm: it runs
        // natively at once if its results are big (`NATIVE_COMBINE_FROM`),
        // else in wasm, and natively again if wasm fails (numpy, say).
        // (The files are read only for such a job: a module's files may
        // have to be read from the disk cache.)
        let native = (self.native_for(id)).and_then(|python| Some((python, env.job_files(&hash)?)));
        let native_combine = native
            .clone()
            .filter(|(_, files)| antnest_sandbox::job_files::may_combine(files));
        let mut combined_natively = false;
        let start_combine = |feed_rx, native: Option<(NativePython, Arc<[u8]>)>| {
            let (env, component) = (env.clone(), component.clone());
            tokio::task::spawn_blocking(move || {
                let results = InOrder::new(feed_rx);
                match native {
                    Some((python, files)) => {
                        NativeRunner::new(python, files, limits).combine(results)
                    }
                    None => {
                        antnest_sandbox::run_combine(&env, &component, limits, Box::new(results))
                    }
                }
            })
        };
        let mut feed_rx = Some(feed_rx);
        let mut combiner = None;
        let streamer = match events.clone().filter(|_| master.streams) {
            Some(events) => {
                Some(Streamer::start(env.clone(), component.clone(), limits, events).await)
            }
            None => None,
        };

        // Split on a blocking thread; `tx` blocks when 4096 taskunits wait.
        let split = {
            let (env, component, master, input) = (
                env.clone(),
                component.clone(),
                master.clone(),
                spec.input.clone(),
            );
            let work = {
                let (slots, master) = (self.state.work_waker(), master.clone());
                // On the first taskunits (and now and then after): wake idle
                // slots, and the loop below so that it announces the job.
                move || {
                    slots();
                    master
                        .units_made
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    master.progress.notify_one();
                }
            };
            tokio::task::spawn_blocking(move || {
                let made = &master.input;
                let result = split_job(&env, &component, limits, &input, made, tx, work, native);
                debug!(job = %id, ms = master.started.elapsed().as_millis() as u64, ok = result.is_ok(), "split ended");
                let mut book = master.book.lock().unwrap();
                match result {
                    Ok(total) => book.split_done(total),
                    Err(e) => book.fail(e),
                }
                drop(book);
                // A job with no taskunits, or a failed split, is done.
                master.progress.notify_one();
            })
        };
        let announce = self.announcement(id, &master);
        let mut last_announce: Option<Instant> = None;
        let mut last_progress = Instant::now();
        // Results accepted and not yet passed to the combine.
        let mut unfed: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut unfed_bytes = 0;
        // Results accepted so far: how many, and their bytes.
        let mut seen = (0u64, 0u64);
        loop {
            let (finished, has_work, all_issued, prog, accepted, logs) = {
                let mut book = master.book.lock().unwrap();
                let accepted = book.take_accepted();
                let logs = book.take_logs();
                if !book.caught().is_empty() {
                    self.refuse(book.caught().keys().copied());
                }
                (
                    book.is_finished(),
                    book.has_work(),
                    book.all_issued(),
                    master.input.fill(book.progress()),
                    accepted,
                    logs,
                )
            };
            for (index, text) in &logs {
                finishing.note_stderr(*index, text);
            }
            if let Some(events) = &events {
                for (index, text) in logs {
                    let _ = events.send(JobEvent::Log { index, text }).await;
                }
            }
            if let Some(streamer) = &streamer {
                streamer.send(&accepted).await;
            }
            // In pieces of some size: each send may wake the combine's
            // thread, which takes a core from a slot. Small results wait
            // (the combine merges a few small ones at the end in no time).
            let accepted_bytes = accepted.iter().map(|(_, r)| r.len() as u64).sum::<u64>();
            seen = (seen.0 + accepted.len() as u64, seen.1 + accepted_bytes);
            unfed_bytes += accepted_bytes as usize;
            unfed.extend(accepted);
            let feeding =
                !unfed.is_empty() && (finished || enough_to_feed(unfed.len(), unfed_bytes));
            let start = match &native_combine {
                // Where it runs depends on how big the results are: some
                // must be in to tell.
                Some(_) => finished || (seen.0 > 0 && (feeding || all_issued)),
                None => feeding || finished || all_issued,
            };
            if combiner.is_none() && start {
                // The results' bytes, told from those in so far.
                let expected = seen.1 / seen.0.max(1) * expected_units(&prog).max(seen.0);
                let native = (native_combine.clone()).filter(|_| expected >= NATIVE_COMBINE_FROM);
                combined_natively = native.is_some();
                combiner = feed_rx.take().map(|rx| start_combine(rx, native));
            }
            if feeding {
                let _ = feed.send(std::mem::take(&mut unfed));
                unfed_bytes = 0;
            }
            if finished {
                break;
            }
            if has_work
                && master.units_made.load(std::sync::atomic::Ordering::Relaxed)
                && last_announce.is_none_or(|t| t.elapsed() >= self.state.config.announce_every)
            {
                self.state.client.announce(announce.clone()).await;
                debug!(job = %id, "announced");
                last_announce = Some(Instant::now());
            }
            if let Some(events) = &events
                && last_progress.elapsed() >= Duration::from_millis(100)
            {
                let _ = events.try_send(JobEvent::Progress(prog));
                last_progress = Instant::now();
            }
            self.state.work.notify_waiters();
            let _ = tokio::time::timeout(LOOK_EVERY, master.progress.notified()).await;
        }
        drop(feed);
        let _ = split.await;
        self.state.master.jobs.lock().unwrap().remove(&id);
        if master
            .input
            .damage
            .lock()
            .unwrap()
            .iter()
            .any(Damage::happened)
        {
            // Some taskunits may hold zeros or newer bytes: no result to trust.
            if let Some(journal) = master.journal.lock().unwrap().take() {
                journal.remove();
            }
            return Err(SubmitError::InputChanged);
        }

        let done = {
            let mut book = master.book.lock().unwrap();
            if book.is_cancelled() {
                finishing.entry.outcome = "cancelled".into();
                return Err(SubmitError::Cancelled);
            }
            if let Some(e) = book.fatal() {
                return Err(SubmitError::Split(e.to_string()));
            }
            let mut known = self.state.master.turnarounds.lock().unwrap();
            if known.len() >= REMEMBERED_MODULES && !known.contains_key(&hash) {
                known.clear();
            }
            known.insert(hash, book.times());
            book.finish()
        };
        {
            let mut counted = self.state.master.per_peer.lock().unwrap();
            for (peer, n) in &done.per_worker {
                if counted.len() < PER_PEER_KEPT || counted.contains_key(peer) {
                    *counted.entry(*peer).or_default() += n;
                }
            }
        }
        for (peer, n) in &done.unleased {
            self.state
                .unleased
                .fetch_add(*n, std::sync::atomic::Ordering::Relaxed);
            warn!(job = %id, %peer, n, "outcomes from a peer not given those taskunits were dropped");
        }
        let prog = done.progress;
        let failures = done.failures;
        // How each worker still connected was reached (direct, or through
        // a relay and then directly after hole punching).
        let per_peer = by_name(&done.per_worker);
        let reached = (self.state.client.peers().await)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.connected && per_peer.contains_key(&p.peer_id))
            .filter_map(|p| Some((p.peer_id, p.via?)))
            .collect();
        let stats = JobStats {
            job_id: id.to_string(),
            module: hash.to_string(),
            tasks: prog.total.unwrap_or(prog.done + prog.failed),
            failed: prog.failed,
            wall_ms: 0,
            per_peer,
            unleased: by_name(&done.unleased),
            compiled,
            resumed: done.resumed,
            native_tasks: done.native,
            combined_natively,
            backups: done.backups,
            verified: done.verified,
            caught: by_name(&done.caught),
            verify_stopped: done.checks_stopped,
            mismatches: prog.mismatches,
            taken_back: prog.taken_back,
            first_result_ms: done
                .first_result
                .map(|t| t.saturating_duration_since(started).as_secs_f64() * 1000.0),
            module_sent,
            reached,
        };
        let mut report = JobReport {
            output: ByteBuf::new(),
            stats,
            failures: failures.iter().map(|(i, e)| (*i, e.to_string())).collect(),
        };
        if let Some((index, error)) = failures.first().cloned()
            && !spec.keep_going
        {
            report.stats.wall_ms = started.elapsed().as_millis() as u64;
            finishing.report(&report, "failed");
            return Err(SubmitError::TasksFailed {
                tasks: report.stats.tasks,
                failed: report.stats.failed,
                index,
                error,
                report: Box::new(report),
            });
        }
        if let Some(streamer) = streamer {
            streamer.finish().await;
        }
        let results = done.results;
        let passed_on = done.passed_on;
        debug!(job = %id, ms = started.elapsed().as_millis() as u64, "all results in");
        let combiner = match combiner {
            Some(c) => c,
            None => start_combine(feed_rx.take().expect("the combine starts once"), None),
        };
        let mut combined = combiner.await.expect("combine task");
        if let (Err(e), Some((python, files)), false) =
            (&combined, native_combine, combined_natively)
        {
            debug!(job = %id, "the combine failed in wasm, so it runs natively: {e}");
            let results: Vec<Vec<u8>> = results.values().cloned().collect();
            let runner = NativeRunner::new(python, files, limits);
            combined = tokio::task::spawn_blocking(move || runner.combine(results.into_iter()))
                .await
                .expect("combine task");
            report.stats.combined_natively = true;
        }
        let output = match combined {
            // A caught worker's results reached the job's own combine (or
            // the submitter) before it was caught: no output built on them.
            Ok(out) if passed_on > 0 && (out.is_some() || master.streams) => {
                return Err(SubmitError::WrongResultsPassedOn(passed_on));
            }
            Ok(Some(out)) => out,
            Ok(None) => tokio::task::spawn_blocking(move || {
                antnest_sandbox::default_combine(results.into_values(), limits.combined_output())
            })
            .await
            .expect("combine task")
            .map_err(|e| SubmitError::Combine(e.to_string()))?,
            Err(e) => return Err(SubmitError::Combine(e.to_string())),
        };
        let journal = master.journal.lock().unwrap().take();
        if let Some(journal) = journal.filter(Journal::on_disk) {
            // Off the answer's path; the runtime waits for it at exit.
            tokio::task::spawn_blocking(move || journal.remove());
        }
        report.output = ByteBuf::from(output);
        report.stats.wall_ms = started.elapsed().as_millis() as u64;
        finishing.report(&report, "done");
        info!(job = %id, tasks = report.stats.tasks, ms = report.stats.wall_ms, "job done");
        Ok(report)
    }
}

/// What identifies a job's input in its journal, so that `--resume` with
/// another input is refused: a file by its path, size and modification
/// time; bytes by their length and CRC-32 (a guard against mistakes, not
/// against forgery; cheap enough for a big stdin at every submit).
fn input_identity(input: &InputSpec) -> String {
    match input {
        InputSpec::Path(p) => {
            let meta = std::fs::metadata(p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let mtime = meta
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("file:{}:{len}:{mtime}", p.display())
        }
        InputSpec::Bytes(b) => format!("bytes:{}:{:08x}", b.len(), crc32fast::hash(b)),
    }
}

/// The share of remote results checked on an open mesh (see
/// `JobBook::with_checks`) unless the submitter says otherwise.
pub const DEFAULT_VERIFY: f64 = 0.02;

/// A key for picking the taskunits to check, of this job only.
fn check_key() -> u64 {
    JobId::random().0
}

//! One worker slot's loop: find a batch (from the job furthest behind its
//! share, this peer's own or another's, else a long poll at the last master), run
//! it on the slot's thread with a reused instance, hand the results in
//! (with the pull for the next batch), repeat.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use antnest_proto::{ModuleHash, TaskOutcome};
use libp2p::PeerId;
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use crate::master::job::enough_to_feed;
use crate::net::TaskStream;
use crate::state::Peer;
use crate::worker::batch::{Batch, BatchFrom, HeldResults, batch_ran, run_batch, units_for};
use crate::worker::remote_batch::{RemoteBatch, run_claimed};
use crate::worker::runner::Runner;
use crate::worker::thread::SlotThread;

/// Work per batch from this peer's own jobs. The slot's thread takes the
/// next batch itself, so small batches cost nothing and let the master's
/// own slots even out the end of a job.
pub(crate) const LOCAL_BATCH: Duration = Duration::from_millis(1);
/// Work per batch pulled from another peer: longer, so the pull's round
/// trip is a smaller share of it.
pub(crate) const REMOTE_BATCH: Duration = Duration::from_millis(80);
/// How often a slot running its own peer's job wakes the job's loop, when
/// it has results to pass on (to the combine, or to a submitter that
/// streams them); the end of the job wakes it at once.
pub(crate) const NOTIFY_EVERY: Duration = Duration::from_millis(5);
/// A remote batch's early results leave at least this long (of work)
/// before the batch's end: more if exchanges with its master take longer.
pub(crate) const PREFETCH_MIN: Duration = Duration::from_micros(500);
/// A worker slot idle this long drops its cached instances.
pub(crate) const IDLE_RELEASE: Duration = Duration::from_secs(5);
/// How long a slot with no job known anywhere sleeps between looks, unless
/// woken first (a job announced or submitted wakes it at once).
pub(crate) const IDLE_NO_JOBS: Duration = Duration::from_secs(5);

/// Hand memory freed by the allocator back to the OS (glibc keeps it).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no
    // preconditions and may be called from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Peer {
    /// One worker slot: pull a batch, run it, return the results, repeat.
    ///
    /// Results for a remote master go back in the background, so the slot
    /// can pull its next batch meanwhile (one delivery in flight per slot;
    /// an undelivered result's lease expires and the master re-issues the
    /// taskunit).
    pub(crate) async fn work_loop(self, slot: usize, stop: watch::Receiver<bool>) {
        // Per-slot state: one runner per module (instances are reused), and
        // the measured time per taskunit of each module, to size batches (a
        // new job of a module starts from its last job's figure).
        let mut runners: HashMap<ModuleHash, Runner> = HashMap::new();
        let mut seen_refusals = self.state.env.memory_refusals();
        let mut per_unit: HashMap<ModuleHash, Duration> = HashMap::new();
        let mut idle = Duration::from_millis(1);
        let mut idle_since = Instant::now();
        let mut delivering: Option<tokio::task::JoinHandle<()>> = None;
        // This slot's stream to each master it pulls from, and the master
        // of the last remote batch it ran (where it waits for more).
        let mut streams: HashMap<PeerId, TaskStream> = HashMap::new();
        let mut last_master: Option<PeerId> = None;
        // A batch that came back with the results of the last one, and the
        // last one's final results, which go with the next one's.
        let mut next: Option<Batch> = None;
        let mut carry: Option<HeldResults> = None;
        // How long an exchange with each master took last.
        let mut exchange_time: HashMap<PeerId, Duration> = HashMap::new();
        let thread = SlotThread::spawn(slot);
        while !*stop.borrow() {
            // Listen before looking: work that turns up while `find_work`
            // runs (a job announced, taskunits split) still wakes this slot
            // instead of waiting out `idle`.
            let notified = self.state.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if next.is_none()
                && let Some(c) = carry.take()
            {
                let (peer, req) = c.into_results();
                self.deliver(&mut delivering, peer, req).await;
            }
            let batch = match next.take() {
                Some(batch) => Some(batch),
                None => self.find_work(&per_unit, &mut streams).await,
            };
            let Some(batch) = batch else {
                // Known only to the master of the last remote batch, the
                // slot waits there: the master answers as soon as a job of
                // its has taskunits, with no announcement and pull between.
                // Otherwise jobs that may have work later (a master that
                // said "not yet", leases that may expire) are looked at
                // again soon; with no job at all, only a wake-up brings work.
                let waiting_at =
                    last_master.filter(|m| streams.contains_key(m) && self.waits_only_on(*m));
                if let Some(master) = waiting_at {
                    next = self
                        .wait_at(master, &per_unit, &mut streams, notified, &stop)
                        .await;
                } else {
                    let wait = if self.knows_no_jobs() {
                        IDLE_NO_JOBS
                    } else {
                        idle
                    };
                    let _ = tokio::time::timeout(wait, notified).await;
                }
                if next.is_some() {
                    continue;
                }
                idle = (idle * 2).min(Duration::from_millis(50));
                // An idle peer gives its instances' memory back: after a
                // while, or at once when an instance was refused memory.
                if (idle_since.elapsed() > IDLE_RELEASE || self.refused_since(&mut seen_refusals))
                    && !runners.is_empty()
                {
                    runners.clear();
                    per_unit.clear();
                    streams.retain(|m, _| Some(*m) == last_master);
                    release_freed_memory();
                    debug!(slot, "idle: instances dropped, freed memory released");
                }
                continue;
            };
            idle = Duration::from_millis(1);
            idle_since = Instant::now();
            let Batch {
                job,
                source,
                module,
                limits,
                units,
            } = batch;
            // A runner of the other kind (the job's runtime differs from
            // the last job's of this module) is not reused.
            let native =
                self.native_for(job).is_some() && self.state.env.files_in_memory(&module).is_some();
            let runner = match runners.remove(&module).filter(|r| r.is_native() == native) {
                Some(r) => r,
                None => {
                    let peer = self.clone();
                    let made =
                        tokio::task::spawn_blocking(move || peer.runner_for(job, module, limits))
                            .await
                            .expect("compile task");
                    match made {
                        Ok(r) => r,
                        Err(e) => {
                            warn!(slot, %job, "cannot load module: {e}");
                            self.state.worker.remotes.lock().unwrap().remove(&job);
                            continue;
                        }
                    }
                }
            };
            // A batch of the master's own job goes on from the book on the
            // slot's thread, with no trip through tokio between batches.
            let local = match &source {
                BatchFrom::Local(master) => Some((master.clone(), stop.clone())),
                BatchFrom::Remote(_) => None,
            };
            let remote = match &source {
                BatchFrom::Remote(peer) => Some(*peer),
                BatchFrom::Local(_) => None,
            };
            // A remote batch's taskunits are handed out one by one to the
            // slot, so that the master may take back those not started.
            let claims = remote.map(|peer| {
                let claims = Arc::new(RemoteBatch::new(job, peer, &units));
                self.state
                    .worker
                    .batches
                    .lock()
                    .unwrap()
                    .push(claims.clone());
                claims
            });
            // A remote batch hands in its results early, before its last
            // taskunits (about one exchange's time of work), asking for the
            // next batch: the round trip runs while the slot computes.
            let (early_tx, early_rx) = oneshot::channel::<(Vec<TaskOutcome>, Duration)>();
            let early_at = remote.map_or(usize::MAX, |peer| {
                let ahead = exchange_time
                    .get(&peer)
                    .map_or(PREFETCH_MIN, |t| (*t * 3 / 2).max(PREFETCH_MIN));
                let last = per_unit
                    .get(&module)
                    .map_or(1, |u| (ahead.as_nanos() / u.as_nanos().max(1)) as usize + 1);
                // Not before half the batch is done: its results would
                // wait for the next batch's.
                units.len().saturating_sub(last).max(units.len() / 2)
            });
            let state = self.state.clone();
            let claimed = claims.clone();
            let run = thread.run(move || {
                let mut runner = runner;
                let mut units = units;
                if let Some(claims) = claimed {
                    let started = Instant::now();
                    let first = run_claimed(&mut runner, &units, &claims, early_at);
                    let mut n = first.len() as u32;
                    let handed_in = if early_at < units.len() {
                        let _ = early_tx.send((first, started.elapsed()));
                        let rest_started = Instant::now();
                        let rest = run_claimed(&mut runner, &units, &claims, usize::MAX);
                        n += rest.len() as u32;
                        (rest, rest_started.elapsed())
                    } else {
                        (first, started.elapsed())
                    };
                    let total = started.elapsed();
                    batch_ran(&state, slot, job, n, total);
                    // None run (all given back): no time per taskunit.
                    let unit_time = total.checked_div(n).unwrap_or_default();
                    return (runner, Some(handed_in), unit_time);
                }
                // A batch of this peer's own job (the only other kind).
                let (master, stop) = local.expect("a batch without claims is local");
                let mut notify_at = Instant::now();
                loop {
                    let started = Instant::now();
                    let n = units.len() as u32;
                    let outcomes = run_batch(&mut runner, units);
                    let total = started.elapsed();
                    let unit_time = total / n.max(1);
                    batch_ran(&state, slot, job, n, total);
                    let now = Instant::now();
                    // Another job behind its share takes the slot next.
                    let stopped = *stop.borrow() || state.worker.shares.should_yield(job);
                    let feed;
                    (units, feed) = master.record(|book| {
                        book.complete(state.local, outcomes);
                        let (n, bytes) = book.accepted_waiting();
                        let feed = master.streams || enough_to_feed(n, bytes);
                        let units = if stopped {
                            Vec::new()
                        } else {
                            book.lease_local(state.local, units_for(unit_time, LOCAL_BATCH), now)
                        };
                        (units, feed)
                    });
                    // The job's loop looks every [`LOOK_EVERY`] anyway: wake it
                    // when nothing is left to take (a finished job
                    // included), and now and then when it has results to
                    // pass on (to the combine, or to a submitter that
                    // streams them); not for each taskunit, as each
                    // wake-up takes a core from a slot for a moment. Only
                    // with the book unlocked, or the loop wakes to wait
                    // for it.
                    if units.is_empty() {
                        master.progress.notify_one();
                        return (runner, None, unit_time);
                    }
                    if feed && now >= notify_at {
                        master.progress.notify_one();
                        notify_at = now + NOTIFY_EVERY;
                    }
                }
            });
            let prefetch = async {
                let peer = remote?;
                let (mut outcomes, mut compute) = early_rx.await.ok()?;
                if let Some(c) = carry.take_if(|c| c.job == job && c.peer == peer) {
                    outcomes.extend(c.outcomes);
                    compute += c.compute;
                }
                let (req, pull) = self.results_with_pull(&per_unit, job, module, outcomes, compute);
                let asked = Instant::now();
                let batch = if pull > 0 {
                    self.request_batch(job, peer, module, limits, req, &mut streams)
                        .await
                } else {
                    if let Err(e) = self.exchange(&mut streams, peer, req).await {
                        debug!(%job, "results not delivered: {e}");
                    }
                    None
                };
                exchange_time.insert(peer, asked.elapsed());
                batch
            };
            let (done, prefetched) = tokio::join!(run, prefetch);
            if let Some(claims) = &claims {
                self.state
                    .worker
                    .batches
                    .lock()
                    .unwrap()
                    .retain(|c| !Arc::ptr_eq(c, claims));
            }
            let (runner, handed_in, unit_time) = done.expect("task batch");
            if !unit_time.is_zero() {
                per_unit.insert(module, unit_time);
            }
            // Cached instances hold memory other slots may need: they go
            // when the budget is tight, or a taskunit was refused memory.
            if runners.len() >= 4
                || self.state.env.memory_tight()
                || self.refused_since(&mut seen_refusals)
            {
                runners.clear();
            }
            runners.insert(module, runner);
            // Results of a remote job's batch go back to its master.
            let (Some(peer), Some((outcomes, compute))) = (remote, handed_in) else {
                continue;
            };
            last_master = Some(peer);
            if let Some(batch) = prefetched {
                // The last results go with the next batch's.
                carry = Some(HeldResults {
                    job,
                    peer,
                    outcomes,
                    compute,
                });
                next = Some(batch);
                continue;
            }
            // Ask for the next batch of the job with these results.
            let (req, pull) = self.results_with_pull(&per_unit, job, module, outcomes, compute);
            if pull > 0 {
                next = self
                    .request_batch(job, peer, module, limits, req, &mut streams)
                    .await;
                continue;
            }
            self.deliver(&mut delivering, peer, req).await;
        }
        // Stopping: results held for the next batch go now.
        if let Some(c) = carry.take() {
            let (peer, req) = c.into_results();
            self.deliver(&mut delivering, peer, req).await;
        }
        if let Some(last) = delivering {
            let _ = last.await;
        }
    }

    /// Whether an instance of this peer was refused memory for want of its
    /// budget since `seen` (the refusal count last seen, moved on here):
    /// then the instances a slot keeps idle should go.
    fn refused_since(&self, seen: &mut u64) -> bool {
        let now = self.state.env.memory_refusals();
        std::mem::replace(seen, now) != now
    }
}

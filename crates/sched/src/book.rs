//! The master's book-keeping for one job: taskunits come from the split as
//! workers ask for them (so a huge input never sits in memory as taskunits),
//! are leased to workers, re-issued when a lease expires or its worker
//! vanishes, and retired by the first result that comes back.
//!
//! With replication (`--replicate K`), each taskunit is run on K distinct
//! workers; it is retired when all K results hash the same. A mismatch is
//! counted, reported, and the taskunit is run again (up to the attempt limit).
//! Each (taskunit, replica) pair is a [`Replica`] with its own lease.
//!
//! `JobBook` is plain data behind a `std::sync::Mutex`; every method is short
//! and never awaits. `lease*` hands taskunits to a worker; `take_*` hands
//! over, and clears, what waits to be passed on (results, guest stderr,
//! journal records).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::mpsc::TryRecvError;
use std::time::{Duration, Instant};

use antnest_proto::limits::MAX_BATCH_BYTES;
use antnest_proto::{PeerId, SharedBytes, TaskError, TaskOutcome, TaskUnit};

pub use antnest_proto::control::Progress;

use crate::intake::SplitReceiver;
use crate::journal;
use crate::pace::{Pace, WorkerTimes};

/// One replica of one taskunit: (index, replica number). Leases, backups
/// and the queue hold replicas; a worker slot is a thread of a worker.
pub(crate) type Replica = (u64, u8);

pub(crate) struct Lease {
    worker: PeerId,
    since: Instant,
    deadline: Instant,
    /// Taskunits leased together with this one (the worker runs them in
    /// turn and hands their results in together).
    batch: u32,
}

/// One replica's result, waiting for the others.
struct Vote {
    worker: PeerId,
    digest: [u8; 32],
    bytes: Vec<u8>,
}

/// What a finished job leaves (see [`JobBook::finish`]).
pub struct Finished {
    pub progress: Progress,
    /// Taskunits that failed every attempt, in order, with the last error.
    pub failures: Vec<(u64, TaskError)>,
    pub per_worker: BTreeMap<PeerId, u64>,
    /// Outcomes dropped because their worker held no replica of the
    /// taskunit, by worker.
    pub unleased: BTreeMap<PeerId, u64>,
    pub first_result: Option<Instant>,
    pub resumed: u64,
    /// Results run by native CPython (the others ran in wasm).
    pub native: u64,
    /// Backup copies handed out of taskunits a late worker held.
    pub backups: u64,
    /// Spot checks that found a worker's result right (`--verify`).
    pub verified: u64,
    /// Workers caught with a wrong result by a spot check, and how many.
    pub caught: BTreeMap<PeerId, u64>,
    /// Results of caught workers passed on to the combine before they were
    /// caught (the combine's output cannot be trusted if any).
    pub passed_on: u64,
    /// Spot checks stopped: the job's results vary between runs.
    pub checks_stopped: bool,
    /// Results in taskunit order (failed taskunits are absent).
    pub results: BTreeMap<u64, Vec<u8>>,
}

/// The record of one job. Its fields are grouped by what they are for; the
/// rules that read them (shares, end game, backups) are in [`policy`].
pub struct JobBook {
    intake: Intake,
    /// Taskunits emitted and not yet retired, by index.
    open: HashMap<u64, SharedBytes>,
    /// Replicas that nobody holds a lease on, oldest first.
    queue: VecDeque<Replica>,
    leases: HashMap<Replica, Lease>,
    /// Straggler backups (only without replication): near the end of a job,
    /// an idle worker gets a copy of a replica leased to someone else.
    backups: HashMap<Replica, PeerId>,
    timing: Timing,
    reclaims: Reclaims,
    votes: Votes,
    record: Record,
    feed: Feed,
    rules: Rules,
    /// Spot checks of remote workers' results (see [`checks`]).
    checks: checks::Checks,
    /// Set when the split failed or the job was cancelled: it cannot complete.
    fatal: Option<Fatal>,
}

/// Where taskunits come from: the split, through its queue.
#[derive(Default)]
struct Intake {
    /// Taskunits straight from the split; `None` once the split has ended.
    split: Option<SplitReceiver>,
    next_index: u64,
    /// Taskunits the split made, once it has finished.
    split_total: Option<u64>,
}

/// How fast each worker is, as this job measures it.
#[derive(Default)]
struct Timing {
    /// Time per taskunit from lease to result (network and a batch queued
    /// behind another included) of each worker's last batch, and of the
    /// last batch of any worker: how long a batch is expected to be held.
    turnaround: HashMap<PeerId, Duration>,
    last_turnaround: Option<Duration>,
    /// Compute time per taskunit of each worker's recent taskunits (a
    /// remote worker's own measure: it asks for its next batch before its
    /// last ends, so the network is off its path), and of any worker's
    /// last batch: how fast each works through its share.
    pace: HashMap<PeerId, Pace>,
    last_pace: Option<Duration>,
    /// When each remote worker last handed in results, and whether it got
    /// taskunits in the same exchange (so it was busy since).
    reported: HashMap<PeerId, (Instant, bool)>,
}

/// Taskunits asked back from slower workers (see [`JobBook::to_reclaim`]).
#[derive(Default)]
struct Reclaims {
    /// Batches (worker, lease time) already asked to give back what they
    /// have not started.
    reclaim_asked: HashMap<PeerId, HashSet<Instant>>,
    taken_back: u64,
    /// Backup copies handed out of taskunits a late worker held.
    backups: u64,
}

/// Replication: results of replicated taskunits, compared.
struct Votes {
    /// Results in so far of replicated taskunits.
    votes: HashMap<u64, Vec<Vote>>,
    /// How many distinct workers must agree on each result.
    replicas: u8,
    mismatches: u64,
}

/// What the job has to show: results, failures, who did what.
#[derive(Default)]
struct Record {
    results: BTreeMap<u64, Vec<u8>>,
    failures: BTreeMap<u64, TaskError>,
    per_worker: BTreeMap<PeerId, u64>,
    /// Results and errors handed in by workers holding no replica of their
    /// taskunit (dropped), by worker.
    unleased: BTreeMap<PeerId, u64>,
    /// When the first result came in.
    first_result: Option<Instant>,
    /// Results read back from the journal of an earlier run.
    resumed: u64,
    /// Results counted in `per_worker` that native CPython ran.
    native: u64,
    attempts: HashMap<u64, u32>,
    /// Results accepted and not yet handed to the journal, encoded as its
    /// records; `None` when the job keeps no journal. The master writes
    /// them outside the book's lock ([`JobBook::take_journal`]).
    journal: Option<Vec<u8>>,
}

/// What waits to be passed on by the master: results to the combine and a
/// streaming submitter, guest stderr to the submitter.
#[derive(Default)]
struct Feed {
    /// Results accepted since the last [`JobBook::take_accepted`].
    accepted: Vec<(u64, Vec<u8>)>,
    accepted_bytes: usize,
    /// Guest stderr not yet passed on to the submitter, by taskunit.
    logs: Vec<(u64, String)>,
    /// Guest stderr collected so far; past [`MAX_LOG`] the rest is dropped.
    log_bytes: usize,
}

/// The job's settings.
struct Rules {
    lease_time: Duration,
    max_attempts: u32,
}

/// Why a job cannot complete.
enum Fatal {
    Cancelled,
    Failed(String),
}

/// The most guest stderr one job forwards to its submitter.
const MAX_LOG: usize = 1 << 20;

impl JobBook {
    /// Guest stderr since the last call, by taskunit.
    pub fn take_logs(&mut self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.feed.logs)
    }
}

impl JobBook {
    pub fn new(split: SplitReceiver, lease_time: Duration, max_attempts: u32) -> Self {
        JobBook {
            intake: Intake {
                split: Some(split),
                ..Default::default()
            },
            open: HashMap::new(),
            queue: VecDeque::new(),
            leases: HashMap::new(),
            backups: HashMap::new(),
            timing: Timing::default(),
            reclaims: Reclaims::default(),
            votes: Votes {
                votes: HashMap::new(),
                replicas: 1,
                mismatches: 0,
            },
            record: Record::default(),
            feed: Feed::default(),
            rules: Rules {
                lease_time,
                max_attempts: max_attempts.max(1),
            },
            checks: checks::Checks::default(),
            fatal: None,
        }
    }

    /// Start from what each worker's batches took per taskunit in an
    /// earlier job of the same module, so that a worker's first batch is
    /// already its share (a worker's measured figures replace these).
    pub fn with_times(mut self, times: WorkerTimes) -> Self {
        self.timing.turnaround = times.turnaround;
        self.timing.pace = times.pace;
        self
    }

    /// What each worker's last batch took per taskunit.
    pub fn times(&self) -> WorkerTimes {
        WorkerTimes {
            turnaround: self.timing.turnaround.clone(),
            pace: self.timing.pace.clone(),
        }
    }

    /// The split finished after making `total` taskunits (some may still
    /// wait in the channel).
    pub fn split_done(&mut self, total: u64) {
        self.intake.split_total = Some(total);
    }

    /// Results accepted since the last call, in the order they came.
    pub fn take_accepted(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.feed.accepted_bytes = 0;
        std::mem::take(&mut self.feed.accepted)
    }

    /// How many results, and how many bytes of them, wait to be taken by
    /// [`Self::take_accepted`].
    pub fn accepted_waiting(&self) -> (usize, usize) {
        (self.feed.accepted.len(), self.feed.accepted_bytes)
    }

    /// Stop the job: nothing more is handed out and the split stops.
    pub fn cancel(&mut self) {
        self.fatal = Some(Fatal::Cancelled);
        self.intake.split = None;
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(self.fatal, Some(Fatal::Cancelled))
    }

    /// Run every taskunit on `k` distinct workers and compare the results.
    pub fn with_replicas(mut self, k: u8) -> Self {
        self.votes.replicas = k.max(1);
        self
    }

    /// Keep a journal: accepted results are encoded as its records for
    /// [`Self::take_journal`]; `done` holds results of an earlier run (by
    /// index), whose taskunits are skipped when the split emits them.
    pub fn set_journal(&mut self, done: BTreeMap<u64, Vec<u8>>) {
        self.record.resumed = done.len() as u64;
        self.record.results = done;
        self.record.journal = Some(Vec::new());
    }

    /// The journal records of the results accepted since the last call, to
    /// be appended to the job's journal once the book is unlocked.
    pub fn take_journal(&mut self) -> Vec<u8> {
        self.record
            .journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Hand over everything a finished job's master needs to report and
    /// combine; the book is left empty.
    pub fn finish(&mut self) -> Finished {
        Finished {
            progress: self.progress(),
            failures: std::mem::take(&mut self.record.failures)
                .into_iter()
                .collect(),
            per_worker: std::mem::take(&mut self.record.per_worker),
            unleased: std::mem::take(&mut self.record.unleased),
            first_result: self.record.first_result,
            resumed: self.record.resumed,
            native: self.record.native,
            backups: self.reclaims.backups,
            verified: self.checks.verified,
            caught: self.checks.caught.clone(),
            passed_on: self.checks.passed_on,
            checks_stopped: self.checks_stopped(),
            results: std::mem::take(&mut self.record.results),
        }
    }

    /// Lease up to `max` taskunits to `worker`, a batch that will cross the
    /// network, so it stops growing at [`MAX_BATCH_BYTES`]. Once the split's
    /// total is known, batches shrink as the job nears its end (guided
    /// self-scheduling: at most `worker`'s share of what is left, see
    /// [`Self::share`]), so no worker sits on a big batch while the others
    /// idle.
    pub fn lease(&mut self, worker: PeerId, max: usize, now: Instant) -> Vec<TaskUnit> {
        self.lease_up_to(worker, max, false, now)
    }

    /// [`Self::lease`] for a slot of the master's own peer: its batch shares
    /// the taskunits in memory and crosses no network, so it is not capped
    /// in bytes.
    pub fn lease_local(&mut self, worker: PeerId, max: usize, now: Instant) -> Vec<TaskUnit> {
        self.lease_up_to(worker, max, true, now)
    }

    fn lease_up_to(
        &mut self,
        worker: PeerId,
        max: usize,
        local: bool,
        now: Instant,
    ) -> Vec<TaskUnit> {
        if self.fatal.is_some() || self.refused(worker) {
            return Vec::new(); // failed or cancelled, or a caught worker
        }
        self.reclaim_expired(now);
        if local && self.checks_on() {
            // The master's own slots run the spot checks first.
            let checks = self.lease_checks(worker, max, now);
            if !checks.is_empty() {
                return checks;
            }
        }
        let unissued = self.unissued();
        // A batch is at most the worker's share; over the network, and
        // near the end, only what it would finish first. Backups (below)
        // may fill what was asked for.
        let asked = max;
        let share = self.share(worker, unissued);
        let max = if local {
            max.min(share)
        } else {
            max.min(share).min(self.end_game(worker, unissued, now))
        };
        let max_bytes = if local { usize::MAX } else { MAX_BATCH_BYTES };
        let mut units = Vec::new();
        let mut taken = Vec::new();
        let mut bytes = 0;
        // Slots this worker may not take (it has another replica of them).
        let mut skipped = Vec::new();
        while units.len() < max && bytes < max_bytes && skipped.len() < 256 {
            let slot = match self.queue.pop_front() {
                Some(s) => s,
                None => match self.pull_split() {
                    Some(s) => s,
                    None => break,
                },
            };
            if self.votes.replicas > 1 && self.involved(slot.0, worker) {
                skipped.push(slot);
                continue;
            }
            let data = self.open[&slot.0].clone();
            bytes += data.len();
            self.leases.insert(
                slot,
                Lease {
                    worker,
                    since: now,
                    deadline: now + self.rules.lease_time,
                    batch: 1,
                },
            );
            taken.push(slot);
            units.push(TaskUnit {
                index: slot.0,
                data,
            });
        }
        for slot in &taken {
            if let Some(l) = self.leases.get_mut(slot) {
                l.batch = taken.len() as u32;
            }
        }
        for slot in skipped.into_iter().rev() {
            self.queue.push_front(slot);
        }
        if units.is_empty() && self.intake.split.is_none() && self.votes.replicas == 1 {
            // A master's own slot first asks slower workers to give back
            // what they have not started (its peer sends the ask when the
            // slot finds nothing here), then copies what they still hold.
            if local && self.reclaim_due(worker) {
                return Vec::new();
            }
            units = self.lease_backups(worker, asked, now);
        }
        if let Some((_, busy)) = self.timing.reported.get_mut(&worker) {
            *busy = !units.is_empty();
        }
        units
    }

    /// The next taskunit from the split: its first slot, the other
    /// replicas queued.
    fn pull_split(&mut self) -> Option<Replica> {
        loop {
            let rx = self.intake.split.as_ref()?;
            match rx.try_recv() {
                Ok(data) => {
                    let index = self.intake.next_index;
                    self.intake.next_index += 1;
                    if self.record.results.contains_key(&index) {
                        continue; // done in an earlier run
                    }
                    self.open.insert(index, data);
                    self.queue
                        .extend((1..self.votes.replicas).map(|r| (index, r)));
                    return Some((index, 0));
                }
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => {
                    self.intake.split = None;
                    return None;
                }
            }
        }
    }

    fn reclaim_expired(&mut self, now: Instant) {
        let expired: Vec<Replica> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for slot in expired {
            self.leases.remove(&slot);
            if Self::is_check(&slot) {
                self.requeue_check(slot.0);
            } else {
                self.queue.push_back(slot);
            }
        }
    }

    /// Workers other than `asker` holding taskunits of this job, each with
    /// its batch not yet asked, to ask to give back what they have not
    /// started: `asker`'s slots have run out of taskunits. Each batch is
    /// asked once. Not with replicas (a taskunit given back would have to
    /// go to a worker not already holding another of its replicas).
    pub fn to_reclaim(&mut self, asker: PeerId) -> Vec<PeerId> {
        let unissued = !self.queue.is_empty() || self.intake.split.is_some();
        if self.votes.replicas > 1 || unissued || self.fatal.is_some() {
            return Vec::new();
        }
        let mut batches: Vec<(PeerId, Instant)> =
            self.unasked(asker).map(|l| (l.worker, l.since)).collect();
        batches.sort_unstable();
        batches.dedup();
        let mut workers: Vec<PeerId> = batches.iter().map(|(w, _)| *w).collect();
        workers.dedup();
        for (worker, since) in batches {
            self.reclaims
                .reclaim_asked
                .entry(worker)
                .or_default()
                .insert(since);
        }
        workers
    }

    /// Whether a worker other than `asker` holds a batch not yet asked to
    /// give back what it has not started.
    fn reclaim_due(&self, asker: PeerId) -> bool {
        self.unasked(asker).next().is_some()
    }

    /// The leases of workers other than `asker` whose batch was not yet
    /// asked to give back what it has not started.
    fn unasked(&self, asker: PeerId) -> impl Iterator<Item = &Lease> {
        self.leases
            .values()
            .filter(move |l| l.worker != asker && !self.asked(l))
    }

    /// Whether the batch of lease `l` was asked to give back.
    fn asked(&self, l: &Lease) -> bool {
        self.reclaims
            .reclaim_asked
            .get(&l.worker)
            .is_some_and(|s| s.contains(&l.since))
    }

    /// `worker` gave back these taskunits unstarted: they go to the front
    /// of the queue for whoever asks next. Indices it does not hold are
    /// ignored. How many were taken back.
    pub fn give_back(&mut self, worker: PeerId, indices: &[u64]) -> usize {
        let mut n = 0;
        for index in indices.iter().rev() {
            let slot = (0..self.votes.replicas)
                .map(|r| (*index, r))
                .find(|s| self.leases.get(s).is_some_and(|l| l.worker == worker));
            if let Some(slot) = slot {
                self.leases.remove(&slot);
                self.queue.push_front(slot);
                n += 1;
            }
        }
        self.reclaims.taken_back += n as u64;
        n
    }

    /// Re-issue every taskunit leased to `worker` (it went away).
    pub fn release_worker(&mut self, worker: PeerId) -> usize {
        let held: Vec<Replica> = self
            .leases
            .iter()
            .filter(|(_, l)| l.worker == worker)
            .map(|(s, _)| *s)
            .collect();
        for slot in &held {
            self.leases.remove(slot);
            // Re-issue soon, ahead of fresh taskunits.
            self.queue.push_front(*slot);
        }
        self.backups.retain(|_, w| *w != worker);
        held.len()
    }

    /// Record results from `worker`. Results for retired taskunits (a
    /// duplicate from an expired lease) are ignored.
    pub fn complete(&mut self, worker: PeerId, outcomes: Vec<TaskOutcome>) {
        self.complete_at(worker, outcomes, Instant::now());
    }

    /// [`Self::complete`], with the results handed in at `now`.
    pub fn complete_at(&mut self, worker: PeerId, outcomes: Vec<TaskOutcome>, now: Instant) {
        if let Some((t, done)) = self.held_for(worker, &outcomes, now) {
            // The master's own slots: lease to result is their compute time.
            self.paced(worker, t, done);
        }
        self.record_outcomes(worker, outcomes);
    }

    /// How long `worker` held the taskunits of the first outcome's batch,
    /// per taskunit of it handed in now (a batch may come in parts), and
    /// how many of it are handed in; noted as its turnaround. `None` for a
    /// backup.
    fn held_for(
        &mut self,
        worker: PeerId,
        outcomes: &[TaskOutcome],
        now: Instant,
    ) -> Option<(Duration, u32)> {
        let lease = |index: u64| {
            (0..self.votes.replicas)
                .filter_map(|r| self.leases.get(&(index, r)))
                .find(|l| l.worker == worker)
        };
        let first = lease(outcomes.first()?.index)?;
        let since = first.since;
        let done = outcomes
            .iter()
            .filter(|o| lease(o.index).is_some_and(|l| l.since == since))
            .count() as u32;
        let t = now.saturating_duration_since(since) / done.max(1);
        self.timing.turnaround.insert(worker, t);
        self.timing.last_turnaround = Some(t);
        Some((t, done))
    }

    /// Results from a remote worker, which hands them in while it computes
    /// on: its pace is `compute`, its own measure of the time they took,
    /// or the time since its last results if it was busy since and that
    /// is longer (waiting for taskunits to arrive slows it as much as
    /// computing); the time since their lease is its turnaround.
    pub fn complete_computed(
        &mut self,
        worker: PeerId,
        outcomes: Vec<TaskOutcome>,
        compute: Duration,
    ) {
        let now = Instant::now();
        self.held_for(worker, &outcomes, now);
        if !outcomes.is_empty() {
            let n = outcomes.len() as u32;
            let between = match self.timing.reported.get(&worker) {
                Some((at, true)) => now.saturating_duration_since(*at) / n,
                _ => Duration::ZERO,
            };
            let pace = (compute / n).max(between);
            if !pace.is_zero() {
                self.paced(worker, pace, n);
            }
            self.timing.reported.insert(worker, (now, false));
        }
        self.record_outcomes(worker, outcomes);
    }

    /// Note `worker`'s time per taskunit over `n` taskunits just handed
    /// in (a worker's first figure counts for all of its [`Pace`]).
    fn paced(&mut self, worker: PeerId, per_unit: Duration, n: u32) {
        self.timing
            .pace
            .entry(worker)
            .and_modify(|p| p.add(per_unit, n))
            .or_insert_with(|| Pace::steady(per_unit));
        self.timing.last_pace = self.pace(worker);
    }

    /// `worker`'s time per taskunit, if it has been timed.
    pub fn pace(&self, worker: PeerId) -> Option<Duration> {
        self.timing.pace.get(&worker).map(Pace::median)
    }

    fn record_outcomes(&mut self, worker: PeerId, outcomes: Vec<TaskOutcome>) {
        for TaskOutcome {
            index,
            result,
            stderr,
            native,
        } in outcomes
        {
            if !self.open.contains_key(&index) && index < self.intake.next_index {
                continue; // retired already: a duplicate
            }
            let result = result.map(|b| b.into_vec());
            if self.checks_on()
                && (self.settle_check(worker, index, &result) || self.held_for_check(index))
            {
                continue; // a check settled, or a duplicate of a result held for one
            }
            // Only the worker a replica of it was given to may hand it in:
            // others' results and errors (a taskunit not handed out yet
            // included) are dropped, and counted.
            let Some(held) = self.release_replica(index, worker) else {
                *self.record.unleased.entry(worker).or_default() += 1;
                continue;
            };
            if let Some(mut text) = stderr.filter(|t| !t.is_empty())
                && self.feed.log_bytes < MAX_LOG
            {
                // A worker's report may be large; keep within the job's cap.
                let room = MAX_LOG - self.feed.log_bytes;
                text.truncate(text.floor_char_boundary(room));
                self.feed.log_bytes += text.len();
                self.feed.logs.push((index, text));
            }
            if native && result.is_ok() {
                self.record.native += 1;
            }
            self.record(worker, index, held, result);
        }
    }

    /// The slot of `index` that `worker` holds (a lease or a backup), released.
    fn release_replica(&mut self, index: u64, worker: PeerId) -> Option<Replica> {
        let slot = (0..self.votes.replicas).map(|r| (index, r)).find(|s| {
            self.leases.get(s).is_some_and(|l| l.worker == worker)
                || self.backups.get(s).is_some_and(|w| *w == worker)
        })?;
        if self.backups.get(&slot).is_some_and(|w| *w == worker) {
            self.backups.remove(&slot);
        } else {
            self.leases.remove(&slot);
        }
        Some(slot)
    }

    fn record(
        &mut self,
        worker: PeerId,
        index: u64,
        held: Replica,
        result: Result<Vec<u8>, TaskError>,
    ) {
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(err) => {
                if self.count_attempt(index, err) {
                    return;
                }
                // Re-run the replica this worker held (its lease is gone).
                self.queue.push_back(held);
                return;
            }
        };
        *self.record.per_worker.entry(worker).or_default() += 1;
        if self.votes.replicas == 1 {
            if let Some(bytes) = self.hold_for_check(worker, index, bytes) {
                self.accept(index, bytes);
            }
            return;
        }
        self.vote(worker, index, bytes);
    }

    /// Count a failed attempt; true if the taskunit is now failed for good.
    fn count_attempt(&mut self, index: u64, err: TaskError) -> bool {
        let attempts = self.record.attempts.entry(index).or_default();
        *attempts += 1;
        if *attempts >= self.rules.max_attempts {
            self.retire(index);
            self.record.failures.insert(index, err);
            return true;
        }
        false
    }

    fn accept(&mut self, index: u64, bytes: Vec<u8>) {
        if let Some(records) = &mut self.record.journal {
            journal::encode(records, index, &bytes);
        }
        self.retire(index);
        self.feed.accepted_bytes += bytes.len();
        self.feed.accepted.push((index, bytes.clone()));
        self.record.results.insert(index, bytes);
        self.record.first_result.get_or_insert_with(Instant::now);
    }

    fn retire(&mut self, index: u64) {
        self.open.remove(&index);
        self.votes.votes.remove(&index);
        self.record.attempts.remove(&index);
        for r in 0..self.votes.replicas {
            self.leases.remove(&(index, r));
            self.backups.remove(&(index, r));
        }
        self.queue.retain(|(i, _)| *i != index);
    }

    /// The split failed; the job ends with this error. Dropping the
    /// receiving end stops a split still running.
    pub fn fail(&mut self, reason: String) {
        self.fatal.get_or_insert(Fatal::Failed(reason));
        self.intake.split = None;
    }

    pub fn fatal(&self) -> Option<&str> {
        match self.fatal.as_ref()? {
            Fatal::Cancelled => Some("cancelled"),
            Fatal::Failed(reason) => Some(reason),
        }
    }

    /// All taskunits are retired (or the job failed outright).
    pub fn is_finished(&mut self) -> bool {
        if self.fatal.is_some() {
            return true;
        }
        // Notice a split that ended without a last pull.
        if self.intake.split.is_some()
            && self.queue.is_empty()
            && self.open.is_empty()
            && let Some(slot) = self.pull_split()
        {
            self.queue.push_front(slot);
        }
        self.intake.split.is_none() && self.open.is_empty()
    }

    /// Taskunits no worker holds: queued, or made by the split and not
    /// pulled yet (while the split runs, what it has made so far).
    fn unissued(&self) -> usize {
        self.queue.len()
            + match self.intake.split_total {
                Some(total) => total.saturating_sub(self.intake.next_index) as usize,
                None => self
                    .intake
                    .split
                    .as_ref()
                    .map_or(0, SplitReceiver::queued_units),
            }
    }

    /// Whether every taskunit has been handed out (the split has ended):
    /// what is left to do is held by workers.
    pub fn all_issued(&self) -> bool {
        self.fatal.is_some() || (self.intake.split_total.is_some() && self.unissued() == 0)
    }

    /// Whether a worker asking now could get something (or soon will).
    pub fn has_work(&self) -> bool {
        self.fatal.is_none()
            && (!self.queue.is_empty() || self.intake.split.is_some() || !self.open.is_empty())
    }

    pub fn progress(&self) -> Progress {
        Progress {
            done: self.record.results.len() as u64,
            failed: self.record.failures.len() as u64,
            total: self.intake.split_total.or(self
                .intake
                .split
                .is_none()
                .then_some(self.intake.next_index)),
            leased: self.leases.len() as u64,
            workers: self
                .leases
                .values()
                .map(|l| &l.worker)
                .collect::<HashSet<_>>()
                .len() as u64,
            mismatches: self.votes.mismatches,
            taken_back: self.reclaims.taken_back,
            made: self.intake.next_index,
            // The master knows the input (see its `InputSplit`).
            input_bytes: 0,
            input_size: None,
        }
    }

    #[cfg(test)]
    fn failures(&self) -> &BTreeMap<u64, TaskError> {
        &self.record.failures
    }

    pub fn per_worker(&self) -> &BTreeMap<PeerId, u64> {
        &self.record.per_worker
    }

    /// Each worker holding taskunits of this job or with a known pace:
    /// how many it holds, and its compute time per taskunit if known.
    pub fn workers(&self) -> BTreeMap<PeerId, (u64, Option<Duration>)> {
        let mut out: BTreeMap<PeerId, (u64, Option<Duration>)> = BTreeMap::new();
        for l in self.leases.values() {
            out.entry(l.worker).or_default().0 += 1;
        }
        for (w, pace) in &self.timing.pace {
            out.entry(*w).or_default().1 = Some(pace.median());
        }
        out
    }

    /// Hand over the results in taskunit order (failed taskunits are absent).
    #[cfg(test)]
    fn take_results(&mut self) -> BTreeMap<u64, Vec<u8>> {
        std::mem::take(&mut self.record.results)
    }
}

mod checks;
mod policy;
mod replicas;
#[cfg(test)]
mod tests;

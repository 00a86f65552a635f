//! Spot checks (`antnest submit --verify RATE`): a share of the remote
//! workers' results, picked by a hash of the taskunit's index under a key
//! of the job's own (so a worker cannot tell which), is run again on the
//! master's own slots before it is accepted. A worker caught with a wrong
//! result is refused from then on (its leases go back to the queue), and
//! each of its results accepted so far is run again; those already passed
//! on to the job's combine are counted ([`Checks::passed_on`]), so that the
//! master can refuse to give an output built on them. Only without
//! replicas (replicas compare results already).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use antnest_proto::{PeerId, SharedBytes, TaskError, TaskUnit};

use super::{JobBook, Lease, Replica};

/// The replica number a check is leased under (a job with checks has
/// one replica of each taskunit, number 0).
const CHECK: u8 = u8::MAX;

#[derive(Default)]
pub(super) struct Checks {
    /// Checks were asked for (they may have stopped since: `threshold`).
    active: bool,
    /// A taskunit is checked if its keyed hash is under this (0: none).
    threshold: u64,
    key: u64,
    /// The master's own peer, whose slots run the checks.
    local: Option<PeerId>,
    /// Results held for a check.
    pending: HashMap<u64, Held>,
    /// Checks waiting for a slot of the master's own.
    queue: VecDeque<u64>,
    /// The taskunits of each remote worker's accepted results, to run
    /// again if it is caught.
    accepted: HashMap<PeerId, Vec<(u64, SharedBytes)>>,
    /// Workers caught with a wrong result, and how many they were caught
    /// with.
    pub(super) caught: BTreeMap<PeerId, u64>,
    /// Checks that found the worker's result right.
    pub(super) verified: u64,
    /// Results of caught workers that had been passed on before.
    pub(super) passed_on: u64,
}

/// A worker's result held for a check.
struct Held {
    from: PeerId,
    theirs: Vec<u8>,
    /// The master's first result, if it differed from theirs: it is run
    /// once more before anyone is judged.
    ours: Option<Vec<u8>>,
}

/// splitmix64: a hash of `x` spread over all 64 bits.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl JobBook {
    /// Check about `rate` (0 to 1) of the remote workers' results on the
    /// slots of `local`, the master's own peer, picking them with `key`
    /// (keep it from workers). Ignored with replicas.
    pub fn with_checks(mut self, rate: f64, key: u64, local: PeerId) -> Self {
        self.checks.local = Some(local);
        if self.votes.replicas == 1 && rate > 0.0 {
            self.checks.active = true;
            self.checks.threshold = if rate >= 1.0 {
                u64::MAX
            } else {
                (rate * u64::MAX as f64) as u64
            };
            self.checks.key = key;
        }
        self
    }

    /// Workers caught with a wrong result in this job.
    pub fn caught(&self) -> &BTreeMap<PeerId, u64> {
        &self.checks.caught
    }

    pub(super) fn checks_on(&self) -> bool {
        self.checks.active
    }

    /// Whether checks stopped: the job's results vary between runs here.
    pub(super) fn checks_stopped(&self) -> bool {
        self.checks.active && self.checks.threshold == 0
    }

    /// Whether `worker` is refused (caught with a wrong result).
    pub(super) fn refused(&self, worker: PeerId) -> bool {
        self.checks.caught.contains_key(&worker)
    }

    /// Hold `worker`'s result of `index` for a check, if it is one to
    /// check (`None`); else give it back to be accepted, noted as
    /// `worker`'s (to run again if it is caught).
    pub(super) fn hold_for_check(
        &mut self,
        worker: PeerId,
        index: u64,
        bytes: Vec<u8>,
    ) -> Option<Vec<u8>> {
        if !self.checks_on() || self.checks.local.is_none_or(|l| l == worker) {
            return Some(bytes);
        }
        if self.checks.threshold > 0 && mix(index ^ self.checks.key) <= self.checks.threshold {
            let held = Held {
                from: worker,
                theirs: bytes,
                ours: None,
            };
            self.checks.pending.insert(index, held);
            self.checks.queue.push_back(index);
            // Whoever else holds a copy (a backup, or the original of a
            // backup) need not run it: its result would be a second one.
            self.leases.remove(&(index, 0));
            self.backups.remove(&(index, 0));
            return None;
        }
        self.remember_accepted(worker, index);
        Some(bytes)
    }

    /// Whether a result of `index` is held for its check: any other
    /// result of it is a duplicate.
    pub(super) fn held_for_check(&self, index: u64) -> bool {
        self.checks.pending.contains_key(&index)
    }

    /// Note that `worker`'s result of `index` is taken (before it is
    /// retired), to run it again if `worker` is caught.
    fn remember_accepted(&mut self, worker: PeerId, index: u64) {
        if let Some(data) = self.open.get(&index) {
            self.checks
                .accepted
                .entry(worker)
                .or_default()
                .push((index, data.clone()));
        }
    }

    /// Lease up to `max` checks to the master's own `worker`.
    pub(super) fn lease_checks(
        &mut self,
        worker: PeerId,
        max: usize,
        now: Instant,
    ) -> Vec<TaskUnit> {
        let mut units = Vec::new();
        while units.len() < max {
            let Some(index) = self.checks.queue.pop_front() else {
                break;
            };
            let Some(data) = self.open.get(&index) else {
                continue;
            };
            units.push(TaskUnit {
                index,
                data: data.clone(),
            });
            self.leases.insert(
                (index, CHECK),
                Lease {
                    worker,
                    since: now,
                    deadline: now + self.rules.lease_time,
                    batch: 1,
                },
            );
        }
        units
    }

    /// Whether `slot` is a check (it goes back to the checks' queue, and
    /// is never a backup).
    pub(super) fn is_check(slot: &Replica) -> bool {
        slot.1 == CHECK
    }

    pub(super) fn requeue_check(&mut self, index: u64) {
        self.checks.queue.push_front(index);
    }

    /// If `worker` holds the check of `index`, settle it with its
    /// `result`; whether it did.
    pub(super) fn settle_check(
        &mut self,
        worker: PeerId,
        index: u64,
        result: &Result<Vec<u8>, TaskError>,
    ) -> bool {
        if self
            .leases
            .get(&(index, CHECK))
            .is_none_or(|l| l.worker != worker)
        {
            return false;
        }
        self.leases.remove(&(index, CHECK));
        let Some(Held {
            from,
            theirs,
            ours: first,
        }) = self.checks.pending.remove(&index)
        else {
            return true;
        };
        let ours = match result {
            Ok(ours) => ours.clone(),
            // The check could not run here: nothing to hold against theirs.
            Err(_) => {
                self.accept_from(from, index, theirs);
                return true;
            }
        };
        if ours == theirs && !self.refused(from) {
            self.checks.verified += 1;
            self.accept_from(from, index, theirs);
            return true;
        }
        if !self.refused(from) {
            match first {
                // A mismatch: run it here once more before judging; a job
                // whose results vary between runs is not one to check.
                None => {
                    let held = Held {
                        from,
                        theirs,
                        ours: Some(ours),
                    };
                    self.checks.pending.insert(index, held);
                    self.checks.queue.push_front(index);
                    return true;
                }
                Some(first) if first != ours => {
                    self.stop_checks();
                    self.accept_from(from, index, theirs);
                    return true;
                }
                // Twice the same here, and not theirs: theirs is wrong.
                Some(_) => self.catch(from, index),
            }
        }
        // Ours counts, not theirs.
        self.uncount(from);
        *self.record.per_worker.entry(worker).or_default() += 1;
        self.accept(index, ours);
        true
    }

    /// The job's results vary between runs here: stop checking it, and
    /// take the results held for checks as they are.
    fn stop_checks(&mut self) {
        tracing::info!("this job's results vary between runs: spot checks stopped for it");
        self.checks.threshold = 0;
        self.checks.queue.clear();
        for (index, held) in std::mem::take(&mut self.checks.pending) {
            self.leases.remove(&(index, CHECK));
            self.accept_from(held.from, index, held.theirs);
        }
    }

    /// One result fewer counted as `worker`'s.
    fn uncount(&mut self, worker: PeerId) {
        if let Some(n) = self.record.per_worker.get_mut(&worker) {
            *n -= 1;
            if *n == 0 {
                self.record.per_worker.remove(&worker);
            }
        }
    }

    fn accept_from(&mut self, worker: PeerId, index: u64, bytes: Vec<u8>) {
        self.remember_accepted(worker, index);
        self.accept(index, bytes);
    }

    /// `worker` gave a wrong result for `index`: refuse it, and run again
    /// what it holds and each of its results accepted so far.
    fn catch(&mut self, worker: PeerId, index: u64) {
        *self.checks.caught.entry(worker).or_default() += 1;
        tracing::warn!(%worker, index, "a spot check found a wrong result: the worker is refused and its results are run again");
        self.release_worker(worker);
        for (i, data) in self.checks.accepted.remove(&worker).unwrap_or_default() {
            if self.record.results.remove(&i).is_none() {
                continue;
            }
            // Not done, should the master stop and the job be resumed.
            if let Some(records) = &mut self.record.journal {
                crate::journal::retract(records, i);
            }
            match self.feed.accepted.iter().position(|(j, _)| *j == i) {
                Some(at) => {
                    let (_, bytes) = self.feed.accepted.remove(at);
                    self.feed.accepted_bytes -= bytes.len();
                }
                None => self.checks.passed_on += 1,
            }
            self.uncount(worker);
            self.open.insert(i, data);
            self.queue.push_front((i, 0));
        }
    }
}

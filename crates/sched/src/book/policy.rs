//! The rules of what a worker is handed: its share of what is left (by
//! pace), the end game (only what it would finish before any other), and
//! backups of stragglers' taskunits. [`super::JobBook::lease`] applies them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use antnest_proto::{PeerId, TaskUnit};

use super::{JobBook, Lease, Replica};
use crate::pace::Pace;

/// With this few taskunits left to issue, a batch over the network is
/// sized by who would finish each first (see [`JobBook::end_game`]).
pub(super) const END_GAME: usize = 256;

impl JobBook {
    /// `worker`'s share of `unissued` taskunits: its part of all that is
    /// left (held by workers or not), in proportion to each worker's pace
    /// (a worker not timed yet counts as the mean of the others, or all
    /// alike), less what it holds; so a slower worker's last batch ends
    /// about when the others' do. At least one.
    pub(super) fn share(&self, worker: PeerId, unissued: usize) -> usize {
        // Those at work on the job, and those timed on the module's last
        // job (who will likely ask soon).
        let mut workers: HashSet<PeerId> = self.record.per_worker.keys().copied().collect();
        workers.extend(self.leases.values().map(|l| l.worker));
        workers.extend(self.timing.pace.keys().copied());
        workers.insert(worker);
        let speed = |w: PeerId| self.pace(w).map(|t| 1.0 / t.as_secs_f64().max(1e-9));
        let known: Vec<f64> = workers.iter().filter_map(|w| speed(*w)).collect();
        let mean = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let total: f64 = workers.iter().map(|w| speed(*w).unwrap_or(mean)).sum();
        // Of all that is left, those held included (the master's own slot
        // has one in hand when a remote first asks), less what it holds:
        // a share of only the unissued rounds unevenly between near-equal
        // workers.
        let held = self.leases.len();
        let mine = self.leases.values().filter(|l| l.worker == worker).count();
        let share = (unissued + held) as f64 * speed(worker).unwrap_or(mean) / total - mine as f64;
        (share.round().max(1.0)) as usize
    }

    /// How many of the last `unissued` taskunits `worker` would finish
    /// before any other worker at work on the job could: each goes, in
    /// thought, to whoever would end it first, given the taskunits each
    /// holds and its pace. A worker that asks before its batch ends (while
    /// others may be about to be free) so gets only what it will really
    /// be first to. A worker holding nothing gets at least one. Past
    /// [`END_GAME`] taskunits, no limit.
    pub(super) fn end_game(&self, worker: PeerId, unissued: usize, now: Instant) -> usize {
        if unissued > END_GAME {
            return usize::MAX;
        }
        let Some(fallback) = self
            .timing
            .last_pace
            .or_else(|| self.timing.pace.values().map(Pace::median).min())
        else {
            return usize::MAX;
        };
        let pace = |w: PeerId| self.pace(w).unwrap_or(fallback);
        // Each worker holding taskunits: how many, since when.
        let mut held: HashMap<PeerId, (usize, Instant)> = HashMap::new();
        for l in self.leases.values() {
            let e = held.entry(l.worker).or_insert((0, l.since));
            e.0 += 1;
            e.1 = e.1.min(l.since);
        }
        // When each would be free: the asker is at work on what it holds
        // now; others started theirs when leased.
        let mine = held.get(&worker).map_or(0, |h| h.0);
        let mut free = now + pace(worker) * mine as u32;
        let mut others: Vec<(Instant, Duration)> = held
            .iter()
            .filter(|(w, _)| **w != worker)
            .map(|(w, (n, since))| {
                let t = pace(*w);
                ((*since + t * *n as u32).max(now), t)
            })
            .collect();
        let t = pace(worker);
        let mut count = 0;
        for _ in 0..unissued {
            let first = others.iter_mut().min_by_key(|(f, t)| *f + *t);
            match first {
                Some((f, t_other)) if *f + *t_other < free + t => *f += *t_other,
                _ => {
                    count += 1;
                    free += t;
                }
            }
        }
        if mine == 0 { count.max(1) } else { count }
    }

    /// Nothing fresh is left: copy the longest-held taskunits of other
    /// workers (one backup each) so a slow worker does not hold up the end.
    /// Only overdue batches are copied: held half as long again as the
    /// batch and one more taskunit (a worker asks for its next batch before
    /// it ends the last) take at their worker's last pace (or any worker's,
    /// for a worker new to the job). This is speculation for stragglers, as in
    /// MapReduce: a batch on time finishes first anyway, and its copy would
    /// only take a core from the job's last steps.
    pub(super) fn lease_backups(
        &mut self,
        worker: PeerId,
        max: usize,
        now: Instant,
    ) -> Vec<TaskUnit> {
        let overdue = |l: &Lease| {
            self.timing
                .turnaround
                .get(&l.worker)
                .or(self.timing.last_turnaround.as_ref())
                .is_none_or(|t| now.saturating_duration_since(l.since) > *t * (l.batch + 1) * 3 / 2)
        };
        let mut held: Vec<(Instant, Replica)> = self
            .leases
            .iter()
            .filter(|(s, l)| {
                l.worker != worker
                    && !Self::is_check(s)
                    && !self.backups.contains_key(s)
                    && overdue(l)
            })
            .map(|(s, l)| (l.since, *s))
            .collect();
        held.sort_unstable();
        held.truncate(max);
        self.reclaims.backups += held.len() as u64;
        held.into_iter()
            .map(|(_, slot)| {
                self.backups.insert(slot, worker);
                TaskUnit {
                    index: slot.0,
                    data: self.open[&slot.0].clone(),
                }
            })
            .collect()
    }
}

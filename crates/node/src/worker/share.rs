//! How a peer's slots share their time between the jobs they know
//! ([`Shares`]): each job, its own peer's or another's, gets slot time in
//! proportion to its weight (`antnest submit --weight`, 1 by default).
//!
//! Each job has a virtual time: the slot time it has had here, divided by
//! its weight. A slot looking for work tries the jobs in order of virtual
//! time, least first; a slot going on with a job (the next batch asked
//! for with the last one's results, or a master's own slot taking the
//! next taskunits from its book) stops when another job is behind it by
//! more than [`SLACK`]. A job that joins, or that had no work for a while
//! (nothing left to lease, its module still compiling), starts at the
//! least virtual time of the others, so it cannot claim the time it was
//! not there for: a job submitted later gets its share at once, and takes
//! no more than its share until it has caught up.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use antnest_proto::JobId;

/// How far (in virtual time) another job may be behind before a slot
/// leaves the job it is on: about two remote batches, so that two jobs
/// share a slot by turns of that length rather than batch by batch.
pub(crate) const SLACK: Duration = Duration::from_millis(160);

#[derive(Default)]
pub(crate) struct Shares {
    jobs: Mutex<HashMap<JobId, Share>>,
}

#[derive(Debug, Clone, Copy)]
struct Share {
    /// Slot time had here divided by the weight, in seconds.
    vtime: f64,
    weight: u32,
}

impl Shares {
    /// `jobs` (with their weights), in the order a slot should try them:
    /// least virtual time first. Jobs not seen before join at the least
    /// virtual time of those known; jobs no longer among `known` (the
    /// jobs this peer knows at all) are forgotten.
    pub(crate) fn order(
        &self,
        jobs: &[(JobId, u32)],
        known: impl Fn(&JobId) -> bool,
    ) -> Vec<JobId> {
        let mut shares = self.jobs.lock().unwrap();
        shares.retain(|id, _| known(id));
        for (id, weight) in jobs {
            join(&mut shares, *id, *weight);
        }
        let mut order: Vec<(f64, JobId)> =
            jobs.iter().map(|(id, _)| (shares[id].vtime, *id)).collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        order.into_iter().map(|(_, id)| id).collect()
    }

    /// Note `job` (announced, or submitted here) before any slot looks
    /// for work: a slot going on with another job leaves it for this one.
    pub(crate) fn join(&self, job: JobId, weight: u32) {
        join(&mut self.jobs.lock().unwrap(), job, weight);
    }

    /// A slot found work in `job`: every other job known (it had none, or
    /// was not asked) is lifted to `job`'s virtual time, if behind it.
    pub(crate) fn chosen(&self, job: JobId) {
        let mut shares = self.jobs.lock().unwrap();
        let Some(at) = shares.get(&job).map(|s| s.vtime) else {
            return;
        };
        for share in shares.values_mut() {
            share.vtime = share.vtime.max(at);
        }
    }

    /// `job` had `compute` of a slot's time.
    pub(crate) fn charge(&self, job: JobId, compute: Duration) {
        if let Some(share) = self.jobs.lock().unwrap().get_mut(&job) {
            share.vtime += compute.as_secs_f64() / f64::from(share.weight);
        }
    }

    /// Whether a slot on `job` should leave it for another job that is
    /// behind by more than [`SLACK`].
    pub(crate) fn should_yield(&self, job: JobId) -> bool {
        let shares = self.jobs.lock().unwrap();
        if shares.len() < 2 {
            return false;
        }
        let Some(mine) = shares.get(&job) else {
            return false;
        };
        let least = least(&shares);
        mine.vtime - least > SLACK.as_secs_f64()
    }
}

fn join(shares: &mut HashMap<JobId, Share>, job: JobId, weight: u32) {
    let least = least(shares);
    let share = shares.entry(job).or_insert(Share {
        vtime: least,
        weight: 1,
    });
    share.weight = weight.max(1);
}

fn least(shares: &HashMap<JobId, Share>) -> f64 {
    shares
        .values()
        .map(|s| s.vtime)
        .reduce(f64::min)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u8) -> JobId {
        JobId(u64::from(n))
    }

    /// Slots always take the first job of the order and run it for
    /// `batch`: the time each job had after `rounds` batches.
    fn simulate(shares: &Shares, jobs: &[(JobId, u32)], rounds: usize) -> HashMap<JobId, Duration> {
        let batch = Duration::from_millis(80);
        let mut had: HashMap<JobId, Duration> = HashMap::new();
        let mut on: Option<JobId> = None;
        for _ in 0..rounds {
            let next = match on {
                Some(j) if !shares.should_yield(j) => j,
                _ => {
                    let first = shares.order(jobs, |_| true)[0];
                    shares.chosen(first);
                    first
                }
            };
            shares.charge(next, batch);
            *had.entry(next).or_default() += batch;
            on = Some(next);
        }
        had
    }

    #[test]
    fn equal_jobs_get_equal_time() {
        let shares = Shares::default();
        let jobs = [(job(1), 1), (job(2), 1)];
        let had = simulate(&shares, &jobs, 100);
        let (a, b) = (had[&job(1)], had[&job(2)]);
        let diff = a.abs_diff(b);
        assert!(diff <= SLACK + Duration::from_millis(80), "{a:?} vs {b:?}");
    }

    #[test]
    fn weights_share_in_proportion() {
        let shares = Shares::default();
        let jobs = [(job(1), 3), (job(2), 1)];
        let had = simulate(&shares, &jobs, 400);
        let ratio = had[&job(1)].as_secs_f64() / had[&job(2)].as_secs_f64();
        assert!((2.7..=3.3).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn a_late_job_gets_its_share_at_once_but_no_more() {
        let shares = Shares::default();
        // The first job alone for a long while.
        simulate(&shares, &[(job(1), 1)], 100);
        let both = [(job(1), 1), (job(2), 1)];
        let had = simulate(&shares, &both, 20);
        // The newcomer starts at once ...
        assert!(had[&job(2)] > Duration::ZERO);
        // ... and takes about half, not all the time the first had alone.
        let diff = had[&job(1)].abs_diff(had[&job(2)]);
        assert!(diff <= SLACK + Duration::from_millis(80), "{had:?}");
    }

    #[test]
    fn a_job_without_work_banks_no_time() {
        let shares = Shares::default();
        let both = [(job(1), 1), (job(2), 1)];
        shares.order(&both, |_| true);
        // Job 2 has no work: only job 1 is chosen, for a long while.
        for _ in 0..50 {
            shares.chosen(job(1));
            shares.charge(job(1), Duration::from_millis(80));
        }
        shares.chosen(job(1));
        // Job 2 turning up with work does not get the next 4 seconds alone.
        let had = simulate(&shares, &both, 20);
        let diff = had[&job(1)].abs_diff(had[&job(2)]);
        assert!(diff <= SLACK + Duration::from_millis(80), "{had:?}");
    }

    #[test]
    fn forgotten_jobs_leave_the_book() {
        let shares = Shares::default();
        shares.order(&[(job(1), 1), (job(2), 1)], |_| true);
        shares.charge(job(1), Duration::from_secs(1));
        assert!(shares.should_yield(job(1)));
        shares.order(&[(job(1), 1)], |j| *j == job(1));
        assert!(!shares.should_yield(job(1)));
    }
}

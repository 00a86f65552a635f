//! A remote batch as its slot works through it, one taskunit at a time
//! ([`RemoteBatch`]), so that its master may take back those not started
//! yet, and how many to give back ([`give_back_count`]).

use std::time::{Duration, Instant};

use antnest_proto::{JobId, TaskOutcome, TaskUnit};
use libp2p::PeerId;

use crate::worker::runner::Runner;

/// Run a remote batch's taskunits on `runner` as `claims` hands them out,
/// up to position `limit`.
pub(crate) fn run_claimed(
    runner: &mut Runner,
    units: &[TaskUnit],
    claims: &RemoteBatch,
    limit: usize,
) -> Vec<TaskOutcome> {
    // A native runner claims a few ahead (they are in its process at
    // once): those are started, and not given back.
    let mut outcomes = Vec::new();
    runner.run_each(
        || claims.next(limit).map(|i| &units[i]),
        |o| outcomes.push(o),
    );
    outcomes
}

/// How long a taskunit given back takes to reach the master's idle slot
/// (the answer, the book, a wake-up), at most, on a LAN.
const GIVE_BACK_REACH: Duration = Duration::from_millis(1);

/// A remote batch as its slot works through it, one taskunit at a time; the
/// master may take back those not started yet ([`Request::Reclaim`]).
pub(crate) struct RemoteBatch {
    pub(crate) job: JobId,
    pub(crate) master: PeerId,
    pub(crate) indices: Vec<u64>,
    /// Taskunits started (low 32 bits) and where the batch now ends (high
    /// 32 bits), changed together.
    pub(crate) state: std::sync::atomic::AtomicU64,
    pub(crate) started: Instant,
    /// When the taskunit now running started, in ns after `started`.
    pub(crate) current: std::sync::atomic::AtomicU64,
}

impl RemoteBatch {
    pub(crate) fn new(job: JobId, master: PeerId, units: &[TaskUnit]) -> Self {
        RemoteBatch {
            job,
            master,
            indices: units.iter().map(|u| u.index).collect(),
            state: std::sync::atomic::AtomicU64::new(Self::pack(0, units.len())),
            started: Instant::now(),
            current: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `state` from the taskunits started and where the batch ends.
    pub(crate) fn pack(next: usize, end: usize) -> u64 {
        ((end as u64) << 32) | next as u64
    }

    /// (taskunits started, where the batch ends) from `state`.
    pub(crate) fn unpack(state: u64) -> (usize, usize) {
        ((state & 0xffff_ffff) as usize, (state >> 32) as usize)
    }

    /// The position of the next taskunit to run, if the batch goes on
    /// before position `limit`.
    pub(crate) fn next(&self, limit: usize) -> Option<usize> {
        use std::sync::atomic::Ordering;
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let (next, end) = Self::unpack(state);
            if next >= end.min(limit) {
                return None;
            }
            match self.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let at = self.started.elapsed().as_nanos() as u64;
                    self.current.store(at, Ordering::Release);
                    return Some(next);
                }
                Err(now) => state = now,
            }
        }
    }

    /// Give up the taskunits not started that this slot would end later
    /// than the master's slot, which takes `theirs` per taskunit; their
    /// indices.
    pub(crate) fn release(&self, theirs: Duration) -> Vec<u64> {
        use std::sync::atomic::Ordering;
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let (next, end) = Self::unpack(state);
            let unstarted = end.saturating_sub(next);
            if unstarted == 0 {
                return Vec::new();
            }
            // This slot's pace in this batch so far (the taskunits before
            // the running one), else the master's.
            let current = Duration::from_nanos(self.current.load(Ordering::Acquire));
            let mine = match next {
                0 | 1 => theirs,
                n => current / (n as u32 - 1),
            };
            let running_left = if next == 0 {
                Duration::ZERO
            } else {
                mine.saturating_sub(self.started.elapsed().saturating_sub(current))
            };
            let k = give_back_count(unstarted, mine, running_left, theirs, GIVE_BACK_REACH);
            if k == 0 {
                return Vec::new();
            }
            let kept = Self::pack(next, end - k);
            match self
                .state
                .compare_exchange(state, kept, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return self.indices[end - k..end].to_vec(),
                Err(now) => state = now,
            }
        }
    }
}

/// How many of `unstarted` taskunits a worker taking `mine` each (with
/// `running_left` of the one it runs to go) should give to an idle worker
/// taking `theirs` each, `reach` away: the number for which the later of
/// the two ends comes soonest (the fewest, of those alike).
pub(crate) fn give_back_count(
    unstarted: usize,
    mine: Duration,
    running_left: Duration,
    theirs: Duration,
    reach: Duration,
) -> usize {
    let end_here = |k: usize| running_left + mine * (unstarted - k) as u32;
    let end_there = |k: usize| {
        if k == 0 {
            Duration::ZERO
        } else {
            reach + theirs * k as u32
        }
    };
    (0..=unstarted)
        .min_by_key(|&k| (end_here(k).max(end_there(k)), k))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use antnest_proto::{JobId, TaskUnit};

    use super::{RemoteBatch, give_back_count};

    #[test]
    pub(crate) fn a_slow_worker_gives_back_what_it_would_end_after_the_idle_one() {
        let ms = |n: u64| Duration::from_millis(n);
        // Nothing left to start: nothing to give.
        assert_eq!(give_back_count(0, ms(3), ms(1), ms(2), ms(1)), 0);
        // On pace (2 ms each, as the master): the reach makes it not worth it.
        assert_eq!(give_back_count(1, ms(2), ms(1), ms(2), ms(1)), 0);
        // Twice as slow, 6 to go: giving 4, it ends in 1 + 4×2 = 9 ms and
        // the master in 1 + 2×4 = 9; giving 3, it ends in 13; giving 5,
        // the master ends in 11.
        assert_eq!(give_back_count(6, ms(4), ms(1), ms(2), ms(1)), 4);
    }

    #[test]
    pub(crate) fn a_batch_hands_out_each_taskunit_once_and_gives_back_only_unstarted_ones() {
        let units: Vec<TaskUnit> = (10..16)
            .map(|i| TaskUnit {
                index: i,
                data: vec![0u8].into(),
            })
            .collect();
        let master = libp2p::PeerId::random();
        let claims = RemoteBatch::new(JobId(1), master, &units);
        // Up to a limit, then on.
        assert_eq!(claims.next(2), Some(0));
        assert_eq!(claims.next(2), Some(1));
        assert_eq!(claims.next(2), None);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(claims.next(usize::MAX), Some(2));
        // Two taskunits took 20 ms: 10 ms each. A master taking 1 ms each
        // gets all three not started: it ends them in 1 + 3 = 4 ms, before
        // this slot ends the one it runs.
        let given = claims.release(Duration::from_millis(1));
        assert_eq!(given, vec![13, 14, 15]);
        assert_eq!(claims.next(usize::MAX), None, "given back, not run here");
        assert!(claims.release(Duration::from_millis(1)).is_empty());
    }
}

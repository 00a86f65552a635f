//! How fast each worker is: its [`Pace`] (time per taskunit, the median
//! of its recent taskunits) and its turnaround, remembered across jobs of
//! a module ([`WorkerTimes`]).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use antnest_proto::PeerId;

/// A worker's pace is the median of this many taskunits' times (see
/// [`Pace`]).
pub(crate) const PACE_UNITS: u32 = 16;

/// What each worker's batches of a job took per taskunit (see
/// `JobBook::with_times`).
#[derive(Debug, Clone, Default)]
pub struct WorkerTimes {
    pub turnaround: HashMap<PeerId, Duration>,
    pub pace: HashMap<PeerId, Pace>,
}

/// A worker's time per taskunit: the median over its last [`PACE_UNITS`]
/// taskunits (those of one batch count alike, at the batch's mean). One
/// slow taskunit does not move it (the last of a job share the cores with
/// the combine, the answer and the next submit); a steady change does,
/// within half as many taskunits, and a batch of [`PACE_UNITS`] or more
/// sets it outright.
#[derive(Debug, Clone)]
pub struct Pace {
    /// (time per taskunit, how many taskunits), oldest first, counting
    /// [`PACE_UNITS`] in all.
    runs: VecDeque<(Duration, u32)>,
    /// Their median, kept in step (shares ask for it often).
    median: Duration,
}

impl Pace {
    /// A pace as if its last [`PACE_UNITS`] taskunits all took `per_unit`.
    pub fn steady(per_unit: Duration) -> Pace {
        Pace {
            runs: VecDeque::from([(per_unit, PACE_UNITS)]),
            median: per_unit,
        }
    }

    pub(crate) fn add(&mut self, per_unit: Duration, n: u32) {
        let n = n.clamp(1, PACE_UNITS);
        self.runs.push_back((per_unit, n));
        let mut over = self.runs.iter().map(|r| r.1).sum::<u32>() - PACE_UNITS;
        while over > 0 {
            let oldest = self.runs.front_mut().expect("runs count PACE_UNITS");
            let cut = oldest.1.min(over);
            oldest.1 -= cut;
            over -= cut;
            if oldest.1 == 0 {
                self.runs.pop_front();
            }
        }
        self.median = Self::median_of(&self.runs);
    }

    /// The median taskunit's time (the lower of the middle two).
    pub fn median(&self) -> Duration {
        self.median
    }

    fn median_of(runs: &VecDeque<(Duration, u32)>) -> Duration {
        let mut runs: Vec<(Duration, u32)> = runs.iter().copied().collect();
        runs.sort_unstable();
        let middle = PACE_UNITS.div_ceil(2);
        let mut seen = 0;
        for (t, n) in runs {
            seen += n;
            if seen >= middle {
                return t;
            }
        }
        Duration::ZERO
    }
}

//! A batch a slot runs: where it came from ([`BatchFrom`]), the results
//! it holds back to send with the next pull ([`HeldResults`]), and the
//! running of its taskunits.

use std::sync::Arc;
use std::time::Duration;

use antnest_proto::{
    ByteBuf, JobId, Limits, ModuleHash, Request, TaskError, TaskOutcome, TaskUnit,
};
use libp2p::PeerId;
use tracing::debug;

use crate::master::job::MasterJob;
use crate::state::State;
use crate::worker::runner::Runner;

/// How long a taskunit refused memory by the peer's budget waits for it
/// at most, trying again every [`BUSY_PAUSE`].
const BUSY_WAIT: Duration = Duration::from_secs(2);
const BUSY_PAUSE: Duration = Duration::from_millis(25);

/// About `target` of work at `unit_time` per taskunit, 1..=4096 taskunits.
pub(crate) fn units_for(unit_time: Duration, target: Duration) -> usize {
    (target.as_nanos() / unit_time.as_nanos().max(1)).clamp(1, 4096) as usize
}

/// Count and log a batch of `n` taskunits a slot ran in `took`, and
/// charge the time to its job's share.
pub(crate) fn batch_ran(shared: &State, slot: usize, job: JobId, n: u32, took: Duration) {
    debug!(slot, %job, n, compute_ms = took.as_secs_f64() * 1e3, "batch computed");
    shared.worker.shares.charge(job, took);
    shared
        .tasks_done
        .fetch_add(u64::from(n), std::sync::atomic::Ordering::Relaxed);
}

/// Run a batch's taskunits in order on `runner`.
pub(crate) fn run_batch(runner: &mut Runner, units: Vec<TaskUnit>) -> Vec<TaskOutcome> {
    let mut outcomes = Vec::with_capacity(units.len());
    let mut each = units.iter();
    runner.run_each(|| each.next(), |o| outcomes.push(o));
    outcomes
}

pub(crate) fn run_unit(runner: &mut Runner, unit: &TaskUnit) -> TaskOutcome {
    // The peer's memory budget is held by other slots' instances, running
    // or kept idle (those go when a slot sees a refusal): wait a little
    // for it before the taskunit fails here as busy (an attempt). The wait
    // is in wall time, since each try may itself wait at instantiation
    // (the clock starts at the first refusal: none is read otherwise).
    let mut result = runner.process(unit.index, &unit.data);
    if matches!(result, Err(TaskError::Busy(_))) {
        let refused = std::time::Instant::now();
        while matches!(result, Err(TaskError::Busy(_))) && refused.elapsed() < BUSY_WAIT {
            std::thread::sleep(BUSY_PAUSE);
            result = runner.process(unit.index, &unit.data);
        }
    }
    let result = result.map(ByteBuf::from);
    let stderr = Some(runner.take_stderr()).filter(|s| !s.is_empty());
    TaskOutcome {
        index: unit.index,
        result,
        stderr,
        native: runner.is_native(),
    }
}

pub(crate) enum BatchFrom {
    Local(Arc<MasterJob>),
    Remote(PeerId),
}

/// A remote batch's last results, held to go with the next batch's.
pub(crate) struct HeldResults {
    pub(crate) job: JobId,
    pub(crate) peer: PeerId,
    pub(crate) outcomes: Vec<TaskOutcome>,
    pub(crate) compute: Duration,
}

impl HeldResults {
    /// The results to send on their own, and where.
    pub(crate) fn into_results(self) -> (PeerId, Request) {
        let req = Request::Results {
            job: self.job,
            outcomes: self.outcomes,
            compute: self.compute,
            pull: 0,
        };
        (self.peer, req)
    }
}

pub(crate) struct Batch {
    pub(crate) job: JobId,
    pub(crate) source: BatchFrom,
    pub(crate) module: ModuleHash,
    pub(crate) limits: Limits,
    pub(crate) units: Vec<TaskUnit>,
}

//! What a guest sees of its host: the `antnest:job/host` interface (input
//! for `split`, results for `combine`), WASI with no files, network or
//! environment, the memory limiter, and how a failed call is named.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use antnest_proto::{Limits, SharedBytes, TaskError};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::input::SplitInput;
use crate::lines::{split_lines, split_lines_shared};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "job",
        imports: { default: trappable },
    });
}

pub(crate) use bindings::{Job, JobPre};
pub(crate) use wasmtime::component::HasSelf;

/// How much guest stderr is kept to explain a failure.
pub(crate) const STDERR_CAPTURE: usize = 64 * 1024;

/// Bytes a table element is counted as (a function reference).
const TABLE_ELEMENT: usize = 8;

/// The memory every instance of this peer may hold at once, all slots and
/// cached instances together (`antnest peer --max-memory`): each store
/// takes what its memories and tables grow by, and gives it back when it
/// is dropped.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    max: AtomicUsize,
    used: AtomicUsize,
    /// Growths refused for want of budget so far: a sign for instances
    /// kept idle to go.
    refused: std::sync::atomic::AtomicU64,
}

impl MemoryBudget {
    pub(crate) fn new() -> MemoryBudget {
        MemoryBudget {
            max: AtomicUsize::new(usize::MAX),
            used: AtomicUsize::new(0),
            refused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(crate) fn set_max(&self, bytes: usize) {
        self.max.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Take `bytes` if they fit under the maximum.
    fn take(&self, bytes: usize) -> bool {
        let max = self.max();
        let taken = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&u| u <= max)
            })
            .is_ok();
        if !taken {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Which limit a guest's growth ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exceeded {
    /// The instance's own: all its memories and tables together.
    Instance,
    /// The peer's budget, held by other instances.
    Peer,
}

/// Denies growth past the instance's limit (all its memories and tables
/// counted together, so many small memories are no way around it) or past
/// the peer's budget, and remembers which it was.
pub(crate) struct MemoryLimiter {
    limit: usize,
    /// What this store's memories and tables hold.
    used: usize,
    budget: Arc<MemoryBudget>,
    pub(crate) exceeded: Option<Exceeded>,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: usize, budget: Arc<MemoryBudget>) -> MemoryLimiter {
        MemoryLimiter {
            limit,
            used: 0,
            budget,
            exceeded: None,
        }
    }

    fn grow(&mut self, bytes: usize) -> wasmtime::Result<bool> {
        if self.used.saturating_add(bytes) > self.limit {
            self.exceeded = Some(Exceeded::Instance);
            // Trap rather than return -1 so the error names the cause.
            return Err(wasmtime::Error::msg("memory limit reached"));
        }
        if !self.budget.take(bytes) {
            self.exceeded = Some(Exceeded::Peer);
            return Err(wasmtime::Error::msg("the peer's memory budget is in use"));
        }
        self.used += bytes;
        Ok(true)
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.budget.give_back(self.used);
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(desired.saturating_sub(current))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > 1 << 20 {
            return Ok(false);
        }
        self.grow(
            desired
                .saturating_sub(current)
                .saturating_mul(TABLE_ELEMENT),
        )
    }
}

/// What `split` reads and emits, or what `combine` reads and writes.
pub(crate) enum HostIo {
    None,
    Split {
        input: SplitInput,
        /// Takes one taskunit; an error (job cancelled, unit too large) stops the split.
        emit: Box<dyn FnMut(SharedBytes) -> Result<(), String> + Send>,
        emitted: u64,
    },
    Combine {
        results: Box<dyn Iterator<Item = Vec<u8>> + Send>,
        output: Vec<u8>,
        limit: usize,
    },
}

pub(crate) struct GuestState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) stderr: MemoryOutputPipe,
    /// Wall-clock compute deadline of the current call (see
    /// [`crate::engine`]): host calls that wait push it forward.
    pub(crate) deadline: Instant,
    pub(crate) io: HostIo,
    /// What `host.job-files` returns (see [`crate::job_files`]).
    pub(crate) files: std::sync::Arc<[u8]>,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Make `wasi` the same on every peer for a deterministic taskunit
/// ([`antnest_proto::Limits::deterministic`]): its random numbers, secure
/// and insecure, from generators seeded with `seed` (from the taskunit),
/// the wall clock stopped at 2026-01-01, and a monotonic clock that moves
/// 1 µs each time it is read (a guest waiting on it still waits in real
/// time, cut at its deadline as any other).
pub(crate) fn deterministic(wasi: &mut wasmtime_wasi::WasiCtxBuilder, seed: [u8; 32]) {
    use rand::SeedableRng as _;
    use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

    struct Stopped;
    impl HostWallClock for Stopped {
        fn resolution(&self) -> std::time::Duration {
            std::time::Duration::from_micros(1)
        }
        fn now(&self) -> std::time::Duration {
            // 2026-01-01T00:00:00Z.
            std::time::Duration::from_secs(1_767_225_600)
        }
    }
    struct Ticking(std::sync::atomic::AtomicU64);
    impl HostMonotonicClock for Ticking {
        fn resolution(&self) -> u64 {
            1_000
        }
        fn now(&self) -> u64 {
            self.0.fetch_add(1_000, Ordering::Relaxed)
        }
    }
    let mut insecure = seed;
    insecure[0] ^= 0xff;
    let insecure_seed = u128::from_le_bytes(seed[16..].try_into().expect("16 bytes"));
    wasi.secure_random(rand::rngs::StdRng::from_seed(seed))
        .insecure_random(rand::rngs::StdRng::from_seed(insecure))
        .insecure_random_seed(insecure_seed)
        .wall_clock(Stopped)
        .monotonic_clock(Ticking(std::sync::atomic::AtomicU64::new(0)));
}

/// `wasi:clocks/monotonic-clock` as WASI has it, but for a sleep: a guest
/// waiting on a clock (Python's `time.sleep`, `poll` with a timeout) is in
/// a host call, where epoch interruption cannot reach it, so no wait may
/// end past the call's compute deadline. The wait is cut to end just past
/// it; back in wasm, the next epoch check finds the deadline gone and
/// stops the call. Time spent waiting counts as compute time.
pub(crate) struct DeadlineClocks;

impl wasmtime::component::HasData for DeadlineClocks {
    type Data<'a> = ClocksUntil<'a>;
}

pub(crate) struct ClocksUntil<'a> {
    clocks: wasmtime_wasi::clocks::WasiClocksCtxView<'a>,
    deadline: Instant,
}

impl ClocksUntil<'_> {
    pub(crate) fn of(state: &mut GuestState) -> ClocksUntil<'_> {
        ClocksUntil {
            clocks: wasmtime_wasi::clocks::WasiClocksCtxView {
                ctx: state.wasi.clocks(),
                table: &mut state.table,
            },
            deadline: state.deadline,
        }
    }

    /// `nanos` of waiting, cut to end a little past the deadline.
    fn cut(&self, nanos: u64) -> u64 {
        const PAST: std::time::Duration = std::time::Duration::from_millis(1);
        let left = self.deadline.saturating_duration_since(Instant::now()) + PAST;
        nanos.min(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX))
    }
}

use wasmtime_wasi::p2::bindings::clocks::monotonic_clock as mono;

impl mono::Host for ClocksUntil<'_> {
    fn now(&mut self) -> wasmtime::Result<mono::Instant> {
        self.clocks.now()
    }

    fn resolution(&mut self) -> wasmtime::Result<mono::Duration> {
        self.clocks.resolution()
    }

    fn subscribe_instant(
        &mut self,
        when: mono::Instant,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
        let now = self.clocks.now()?;
        let wait = self.cut(when.saturating_sub(now));
        self.clocks.subscribe_duration(wait)
    }

    fn subscribe_duration(
        &mut self,
        nanos: mono::Duration,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
        let wait = self.cut(nanos);
        self.clocks.subscribe_duration(wait)
    }
}

fn host_misuse(what: &str) -> wasmtime::Error {
    wasmtime::Error::msg(format!("host.{what} may not be called here"))
}

/// Run host work (reading input, handing over taskunits, waiting for
/// results) without charging its time to the guest's compute `deadline`.
fn uncharged<T>(deadline: &mut Instant, work: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = work();
    *deadline += started.elapsed();
    out
}

impl bindings::antnest::job::host::Host for GuestState {
    fn read_input(&mut self, max: u32) -> wasmtime::Result<Vec<u8>> {
        let HostIo::Split { input, .. } = &mut self.io else {
            return Err(host_misuse("read-input"));
        };
        uncharged(&mut self.deadline, || {
            crate::input::read_block(input, max)
                .map_err(|e| wasmtime::Error::msg(format!("reading job input: {e}")))
        })
    }

    fn emit(&mut self, unit: Vec<u8>) -> wasmtime::Result<()> {
        let HostIo::Split { emit, emitted, .. } = &mut self.io else {
            return Err(host_misuse("emit"));
        };
        uncharged(&mut self.deadline, || {
            emit(unit.into()).map_err(wasmtime::Error::msg)?;
            *emitted += 1;
            Ok(())
        })
    }

    fn emit_lines(&mut self, max_bytes: u32) -> wasmtime::Result<()> {
        let HostIo::Split {
            input,
            emit,
            emitted,
        } = &mut self.io
        else {
            return Err(host_misuse("emit-lines"));
        };
        let mut emit_one = |unit: SharedBytes| {
            emit(unit)?;
            *emitted += 1;
            Ok(())
        };
        uncharged(&mut self.deadline, || match input {
            SplitInput::Stream(reader) => {
                split_lines(reader.as_mut(), max_bytes as usize, &mut emit_one)
            }
            SplitInput::Bytes { data, pos } => {
                split_lines_shared(data, pos, max_bytes as usize, &mut emit_one)
            }
        })
        .map_err(wasmtime::Error::msg)
    }

    fn next_result(&mut self) -> wasmtime::Result<Option<Vec<u8>>> {
        let HostIo::Combine { results, .. } = &mut self.io else {
            return Err(host_misuse("next-result"));
        };
        // Waiting for a result is not compute time.
        Ok(uncharged(&mut self.deadline, || results.next()))
    }

    fn job_files(&mut self) -> wasmtime::Result<Vec<u8>> {
        Ok(self.files.to_vec())
    }

    fn write_output(&mut self, bytes: Vec<u8>) -> wasmtime::Result<()> {
        let HostIo::Combine { output, limit, .. } = &mut self.io else {
            return Err(host_misuse("write-output"));
        };
        if output.len() + bytes.len() > *limit {
            return Err(wasmtime::Error::msg(format!(
                "combined output exceeds the {limit}-byte limit"
            )));
        }
        output.extend_from_slice(&bytes);
        Ok(())
    }
}

/// Turn a failed call into a [`TaskError`], naming the cause.
pub(crate) fn classify(
    err: wasmtime::Error,
    store: &Store<GuestState>,
    limits: Limits,
) -> TaskError {
    let state = store.data();
    match state.limiter.exceeded {
        Some(Exceeded::Instance) => return TaskError::OutOfMemory(limits.memory),
        Some(Exceeded::Peer) => {
            return TaskError::Busy(format!(
                "this peer's memory budget ({} MiB, --max-memory) is held by other taskunits",
                state.limiter.budget.max() >> 20
            ));
        }
        None => {}
    }
    if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
        return TaskError::Timeout(limits.time);
    }
    let mut msg = if let Some(trap) = err.downcast_ref::<Trap>() {
        trap.to_string()
    } else if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        format!("the job called exit({})", exit.0)
    } else {
        let root = err.root_cause().to_string();
        root.lines().next().unwrap_or_default().to_string()
    };
    let stderr = state.stderr.contents();
    let stderr = String::from_utf8_lossy(&stderr);
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        // The end of stderr is where a panic message is.
        let start = stderr.len().saturating_sub(2000);
        let start = (start..stderr.len())
            .find(|i| stderr.is_char_boundary(*i))
            .unwrap_or(0);
        msg = format!("{msg}; guest stderr: {}", &stderr[start..]);
    }
    TaskError::Trap(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core module of `memories` memories of `pages` wasm pages (64 KiB)
    /// each, all taken at instantiation.
    fn many_memories(memories: u8, pages: u8) -> Vec<u8> {
        assert!(memories < 0x40 && pages < 0x80);
        let mut section = vec![memories];
        for _ in 0..memories {
            section.extend([0, pages]); // no maximum, `pages` at least
        }
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        module.extend([5, section.len() as u8]);
        module.extend(section);
        module
    }

    /// A memory bomb spread thin: instances of a module of 8 memories of
    /// 1 MiB, in one store, count together against its limit (64 MiB:
    /// the ninth instance is refused), and stores count together against
    /// the peer's budget; all of it is given back when a store goes.
    #[test]
    fn many_memories_in_many_instances_count_together() {
        let engine = wasmtime::Engine::new(&crate::engine::engine_config()).unwrap();
        let module = wasmtime::Module::new(&engine, many_memories(8, 16)).unwrap();
        let budget = Arc::new(MemoryBudget::new());
        budget.set_max(96 << 20);
        let store = |budget: &Arc<MemoryBudget>| {
            let mut store =
                wasmtime::Store::new(&engine, MemoryLimiter::new(64 << 20, budget.clone()));
            store.limiter(|l| l);
            store
        };
        let mut first = store(&budget);
        for _ in 0..8 {
            wasmtime::Instance::new(&mut first, &module, &[]).unwrap();
        }
        assert_eq!(budget.used(), 64 << 20);
        assert!(wasmtime::Instance::new(&mut first, &module, &[]).is_err());
        assert_eq!(first.data().exceeded, Some(Exceeded::Instance));
        // A second store gets what is left of the peer's budget.
        let mut second = store(&budget);
        for _ in 0..4 {
            wasmtime::Instance::new(&mut second, &module, &[]).unwrap();
        }
        assert!(wasmtime::Instance::new(&mut second, &module, &[]).is_err());
        assert_eq!(second.data().exceeded, Some(Exceeded::Peer));
        assert_eq!(budget.used(), 96 << 20);
        drop(first);
        assert_eq!(budget.used(), 32 << 20);
        drop(second);
        assert_eq!(budget.used(), 0);
    }
}

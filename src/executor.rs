//! The wasm sandbox: compiles job components (once, cached by content hash),
//! and runs `split`, `process` and `combine` under a time limit, a memory
//! limit and an output size limit.
//!
//! Calls are synchronous and block their thread; callers run them on
//! `spawn_blocking` or a dedicated thread. A [`TaskRunner`] keeps one
//! instance alive across taskunits (re-instantiating per call is far
//! slower) and throws it away after a trap, since a trapped component
//! instance may not be entered again.
//!
//! Deadlines use epoch interruption: one ticker thread per [`Environment`]
//! bumps the engine epoch while guest code runs, every 1/64 of the
//! shortest time limit among the calls running (10 ms to 1 s), so a
//! deadline is kept to within about 1.6% of its limit; it sleeps when none
//! has run for a few ticks, so an idle peer stays quiet. Each tick takes a
//! core from a busy slot for a moment (on a loaded machine, after waiting
//! for the scheduler's next tick), hence no more ticks than that. The
//! deadline callback compares against a wall-clock deadline kept in the
//! store, which host calls that block (a split waiting for workers to take
//! its taskunits) push forward, so only time spent computing counts.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::{MemoryOutputPipe, SinkOutputStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::wire::{MAX_TASKUNIT, ModuleHash, SharedBytes};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "job",
        imports: { default: trappable },
    });
}

use bindings::{Job, JobPre};

/// The epoch advances this many times over the shortest time limit of the
/// guest calls running, and no more often than [`TICK_MIN`], no less than
/// [`TICK_MAX`]; deadlines are accurate to about one tick.
const TICKS_PER_LIMIT: u32 = 64;
pub const TICK_MIN: Duration = Duration::from_millis(10);
pub const TICK_MAX: Duration = Duration::from_secs(1);
/// The ticker sleeps after this many ticks with no guest call running, and
/// wakes on the next call (or after [`IDLE_CHECK`], to see whether its
/// engine is gone).
const IDLE_TICKS: u32 = 3;
const IDLE_CHECK: Duration = Duration::from_secs(10);

/// How much guest stderr is kept to explain a failure.
const STDERR_CAPTURE: usize = 64 * 1024;

/// Limits applied to every guest call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Compute time allowed for one call (one taskunit, or the whole split or combine).
    pub time: Duration,
    /// Linear memory a guest instance may grow to, in bytes.
    pub memory: usize,
    /// Largest result of one taskunit, in bytes (and of the combined output, times 64).
    pub output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: Duration::from_secs(60),
            memory: 512 << 20,
            output: 8 << 20,
        }
    }
}

impl Limits {
    /// The tighter of two sets of limits: a job may ask for less than a peer allows, never more.
    pub fn min(self, other: Limits) -> Limits {
        Limits {
            time: self.time.min(other.time),
            memory: self.memory.min(other.memory),
            output: self.output.min(other.output),
        }
    }

    pub fn combined_output(&self) -> usize {
        self.output.saturating_mul(64)
    }
}

/// Why a module could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("invalid job module {hash}: {reason}")]
    InvalidModule { hash: ModuleHash, reason: String },
    #[error("module cache at {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why one guest call failed. Every variant is a per-task error, never a crash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum TaskError {
    #[error("timed out: used more than {0:?} of compute time")]
    Timeout(Duration),
    #[error("out of memory: the guest tried to grow past the {0}-byte limit")]
    OutOfMemory(usize),
    #[error("output too large: {size} bytes, limit {limit}")]
    OutputTooLarge { size: usize, limit: usize },
    #[error("trap: {0}")]
    Trap(String),
    #[error("job error: {0}")]
    Guest(String),
    #[error("cannot run: {0}")]
    Load(String),
    #[error("the {0} replicas of this taskunit gave different results")]
    Mismatch(usize),
}

/// Cache counters, for the benchmarks and for `--stats-json`.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct CacheStats {
    /// Components compiled from wasm (each costs a full Cranelift compile).
    pub compiled: u64,
    /// Components loaded from the on-disk artifact cache.
    pub disk_hits: u64,
    /// Components found already loaded in memory.
    pub memory_hits: u64,
}

/// One per peer: the engine, the linker, and the compiled-module cache.
/// Cheap to clone.
#[derive(Clone)]
pub struct Environment {
    inner: Arc<EnvInner>,
}

struct EnvInner {
    engine: Engine,
    ticker: Ticker,
    linker: Linker<GuestState>,
    cache_dir: Option<PathBuf>,
    loaded: Mutex<HashMap<ModuleHash, Component>>,
    /// Each component's imports resolved against the linker once
    /// (`instantiate_pre` type-checks every WASI import, ~50 µs), keyed by
    /// the address of its code, which stays put while the entry holds it.
    ready: Mutex<HashMap<usize, JobPre<GuestState>>>,
    /// One gate per module being loaded, so that two threads wanting the
    /// same module (a job's submit and a worker slot, say) compile it once.
    loading: Mutex<HashMap<ModuleHash, Arc<Mutex<()>>>>,
    compiled: AtomicU64,
    disk_hits: AtomicU64,
    memory_hits: AtomicU64,
}

impl Environment {
    /// Build the engine and start its epoch ticker. `cache_dir` keeps module
    /// bytes and compiled artifacts between runs; `None` keeps them in memory only.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, LoadError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(|e| LoadError::InvalidModule {
            hash: ModuleHash::of(b""),
            reason: format!("engine: {e}"),
        })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).expect("WASI links once");
        Job::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut linker, |s| s)
            .expect("host interface links once");
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir).map_err(|source| LoadError::Cache {
                path: dir.clone(),
                source,
            })?;
        }
        let ticker = Ticker::start(&engine);
        Ok(Environment {
            inner: Arc::new(EnvInner {
                engine,
                ticker,
                linker,
                cache_dir,
                loaded: Mutex::new(HashMap::new()),
                ready: Mutex::new(HashMap::new()),
                loading: Mutex::new(HashMap::new()),
                compiled: AtomicU64::new(0),
                disk_hits: AtomicU64::new(0),
                memory_hits: AtomicU64::new(0),
            }),
        })
    }

    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.inner.compiled.load(Ordering::Relaxed),
            disk_hits: self.inner.disk_hits.load(Ordering::Relaxed),
            memory_hits: self.inner.memory_hits.load(Ordering::Relaxed),
        }
    }

    fn module_path(&self, hash: &ModuleHash) -> Option<PathBuf> {
        self.inner
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{hash}.wasm")))
    }

    fn artifact_path(&self, hash: &ModuleHash) -> Option<PathBuf> {
        self.inner
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{hash}-{}.cwasm", env!("CARGO_PKG_VERSION"))))
    }

    /// The module's bytes, if this peer has them on disk.
    pub fn stored_module(&self, hash: &ModuleHash) -> Option<Vec<u8>> {
        std::fs::read(self.module_path(hash)?).ok()
    }

    /// Keep the module's bytes on disk (so this peer can serve them to others).
    pub fn store_module(&self, hash: &ModuleHash, bytes: &[u8]) -> Result<(), LoadError> {
        match self.module_path(hash) {
            Some(path) if !path.exists() => write_atomic(&path, bytes),
            _ => Ok(()),
        }
    }

    /// Whether the compiled component is available without compiling.
    pub fn is_compiled(&self, hash: &ModuleHash) -> bool {
        self.inner.loaded.lock().unwrap().contains_key(hash)
            || self.artifact_path(hash).is_some_and(|p| p.exists())
    }

    /// The compiled component for `hash`: from memory, from the artifact
    /// cache, or compiled from `bytes` (which must hash to `hash`).
    /// Blocks for the whole compile; call it off the async runtime.
    pub fn component(
        &self,
        hash: &ModuleHash,
        bytes: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Result<Component, LoadError> {
        if let Some(c) = self.loaded(hash) {
            return Ok(c);
        }
        let gate = self
            .inner
            .loading
            .lock()
            .unwrap()
            .entry(*hash)
            .or_default()
            .clone();
        let held = gate.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have loaded it while this one waited.
        let loaded = match self.loaded(hash) {
            Some(c) => Ok(c),
            None => self.load(hash, bytes),
        };
        drop(held);
        let mut loading = self.inner.loading.lock().unwrap();
        // Only our own gate: a later caller's may be in place already.
        if loading.get(hash).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
            loading.remove(hash);
        }
        loaded
    }

    /// The compiled component for `hash` if it is in memory (never blocks
    /// for long: no disk, no compile); counted as a memory hit.
    pub fn loaded(&self, hash: &ModuleHash) -> Option<Component> {
        let c = self.inner.loaded.lock().unwrap().get(hash).cloned()?;
        self.inner.memory_hits.fetch_add(1, Ordering::Relaxed);
        Some(c)
    }

    /// `component` past the memory cache: from disk or compiled.
    fn load(
        &self,
        hash: &ModuleHash,
        bytes: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Result<Component, LoadError> {
        let invalid = |reason: String| LoadError::InvalidModule {
            hash: *hash,
            reason,
        };
        let artifact = self.artifact_path(hash);
        if let Some(path) = artifact.as_ref().filter(|p| p.exists()) {
            // SAFETY: artifacts are only ever written by `precompile_component`
            // below, into our own cache directory, under a name that includes
            // the module hash and our version; wasmtime also checks that the
            // artifact matches this engine's configuration.
            if let Ok(c) = unsafe { Component::deserialize_file(&self.inner.engine, path) } {
                self.inner.disk_hits.fetch_add(1, Ordering::Relaxed);
                self.remember(hash, &c);
                return Ok(c);
            }
        }
        let bytes = bytes()
            .or_else(|| self.stored_module(hash))
            .ok_or_else(|| invalid("module bytes not available".into()))?;
        if ModuleHash::of(&bytes) != *hash {
            return Err(invalid("bytes do not match the module hash".into()));
        }
        let serialized = self
            .inner
            .engine
            .precompile_component(&bytes)
            .map_err(|e| invalid(format!("{e:#}")))?;
        self.inner.compiled.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the bytes were produced just now by this engine.
        let component = unsafe { Component::deserialize(&self.inner.engine, &serialized) }
            .map_err(|e| invalid(format!("{e:#}")))?;
        if let Some(path) = artifact {
            write_atomic(&path, &serialized)?;
        }
        self.store_module(hash, &bytes)?;
        self.remember(hash, &component);
        Ok(component)
    }

    fn remember(&self, hash: &ModuleHash, component: &Component) {
        self.inner
            .loaded
            .lock()
            .unwrap()
            .insert(*hash, component.clone());
    }

    fn instantiate(
        &self,
        component: &Component,
        limits: Limits,
        io: HostIo,
    ) -> Result<(Store<GuestState>, Job), TaskError> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let wasi = WasiCtx::builder()
            .stdout(SinkOutputStream)
            .stderr(stderr.clone())
            .build();
        let state = GuestState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: limits.memory,
                exceeded: false,
            },
            stderr,
            deadline: Instant::now() + limits.time,
            io,
        };
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        let period = self.inner.ticker.period.clone();
        store.epoch_deadline_callback(move |ctx| {
            let left = ctx
                .data()
                .deadline
                .saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(Trap::Interrupt.into())
            } else {
                let tick = period.load(Ordering::SeqCst).max(1);
                Ok(UpdateDeadline::Continue(
                    (left.as_nanos() / u128::from(tick)).max(1) as u64,
                ))
            }
        });
        let pre = self.ready(component)?;
        let job = {
            let _running = self.running(limits.time);
            pre.instantiate(&mut store)
                .map_err(|e| TaskError::Load(format!("instantiate: {e:#}")))?
        };
        Ok((store, job))
    }

    /// `component` linked, ready to instantiate.
    fn ready(&self, component: &Component) -> Result<JobPre<GuestState>, TaskError> {
        let key = component.image_range().start as usize;
        if let Some(pre) = self.inner.ready.lock().unwrap().get(&key) {
            return Ok(pre.clone());
        }
        let pre = self
            .inner
            .linker
            .instantiate_pre(component)
            .and_then(JobPre::new)
            .map_err(|e| TaskError::Load(format!("instantiate: {e:#}")))?;
        self.inner.ready.lock().unwrap().insert(key, pre.clone());
        Ok(pre)
    }

    /// Mark guest code with a time limit of `limit` as running (so that
    /// the epoch ticks, often enough for it) until the guard drops.
    fn running(&self, limit: Duration) -> Running<'_> {
        self.inner.ticker.enter(limit)
    }
}

/// The thread that advances an engine's epoch, how many guest calls run
/// now, and the period of its ticks.
struct Ticker {
    thread: std::thread::Thread,
    calls: Arc<AtomicUsize>,
    /// Nanoseconds between ticks, for the calls running.
    period: Arc<AtomicU64>,
    /// The ticker is parked until a call starts.
    idle: Arc<std::sync::atomic::AtomicBool>,
}

impl Ticker {
    fn start(engine: &Engine) -> Ticker {
        let weak = engine.weak();
        let calls = Arc::new(AtomicUsize::new(0));
        let period = Arc::new(AtomicU64::new(TICK_MIN.as_nanos() as u64));
        let idle = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (running, every, parked) = (calls.clone(), period.clone(), idle.clone());
        let handle = std::thread::Builder::new()
            .name("antnest-epoch".into())
            .spawn(move || {
                let mut quiet = 0;
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    quiet = if running.load(Ordering::SeqCst) > 0 {
                        0
                    } else {
                        quiet + 1
                    };
                    if quiet >= IDLE_TICKS {
                        // A call starting from now on sees `idle` and
                        // unparks this thread (or has left it a token, and
                        // this returns at once).
                        parked.store(true, Ordering::SeqCst);
                        if running.load(Ordering::SeqCst) == 0 {
                            std::thread::park_timeout(IDLE_CHECK);
                        }
                        parked.store(false, Ordering::SeqCst);
                    } else {
                        // Woken early by a call with a shorter limit.
                        std::thread::park_timeout(Duration::from_nanos(
                            every.load(Ordering::SeqCst),
                        ));
                    }
                }
            })
            .expect("spawn epoch thread");
        Ticker {
            thread: handle.thread().clone(),
            calls,
            period,
            idle,
        }
    }

    fn enter(&self, limit: Duration) -> Running<'_> {
        let tick = (limit / TICKS_PER_LIMIT)
            .clamp(TICK_MIN, TICK_MAX)
            .as_nanos() as u64;
        let before = if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            self.period.swap(tick, Ordering::SeqCst)
        } else {
            self.period.fetch_min(tick, Ordering::SeqCst)
        };
        // A system call only if the ticker is parked: it is idle, or
        // sleeps for a longer period than this call's limit allows.
        if tick < before || self.idle.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
        Running(&self.calls)
    }
}

struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    // A name of its own per write: two writers of the same file (threads or
    // processes sharing a cache directory) must not rename each other's.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| LoadError::Cache {
            path: path.to_owned(),
            source,
        })
}

/// Denies memory growth past the limit and remembers that it did.
struct MemoryLimiter {
    limit: usize,
    exceeded: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = true;
            // Trap rather than return -1 so the error names the cause.
            return Err(wasmtime::Error::msg("memory limit reached"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// What `split` reads and emits, or what `combine` reads and writes.
enum HostIo {
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

struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    stderr: MemoryOutputPipe,
    /// Wall-clock compute deadline of the current call; see the module doc.
    deadline: Instant,
    io: HostIo,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
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
            let mut buf = vec![0; (max as usize).min(4 << 20)];
            let n = loop {
                match input.read(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(wasmtime::Error::msg(format!("reading job input: {e}")));
                    }
                }
            };
            buf.truncate(n);
            Ok(buf)
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

/// Read `input` to its end and hand it to `emit` as taskunits of whole
/// lines, each at most `max` bytes where the lines allow (a longer line is a
/// taskunit of its own). The newline ending a taskunit is dropped and empty
/// taskunits are skipped. Memory stays around two taskunits; a line longer
/// than [`MAX_TASKUNIT`] is an error.
pub fn split_lines(
    input: &mut dyn Read,
    max: usize,
    emit: &mut dyn FnMut(SharedBytes) -> Result<(), String>,
) -> Result<(), String> {
    let max = max.clamp(1, MAX_TASKUNIT);
    let capacity = max + max / 2;
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    let mut eof = false;
    // Read until `buf` holds more than `want` bytes or the input ends
    // (`read_to_end` reads into spare capacity without zeroing it first).
    let mut fill = |buf: &mut Vec<u8>, want: usize, eof: &mut bool| -> Result<(), String> {
        while !*eof && buf.len() <= want {
            let room = (want + 1 - buf.len()).max(64 << 10);
            buf.reserve(room);
            let n = (&mut *input)
                .take(room as u64)
                .read_to_end(buf)
                .map_err(|e| format!("reading job input: {e}"))?;
            *eof = n < room;
        }
        Ok(())
    };
    loop {
        fill(&mut buf, max, &mut eof)?;
        if buf.is_empty() {
            return Ok(());
        }
        let window = buf.len().min(max + 1);
        let cut = match last_line_end(&buf, max) {
            Some(nl) => nl,
            None if buf.len() <= max => buf.len(), // the end of the input
            None => {
                // A line longer than `max`: it ends at the next newline.
                let mut from = window;
                loop {
                    if let Some(nl) = memchr::memchr(b'\n', &buf[from..]) {
                        break from + nl;
                    }
                    if eof {
                        break buf.len();
                    }
                    if buf.len() > MAX_TASKUNIT {
                        return Err(line_too_long());
                    }
                    from = buf.len();
                    let want = buf.len() * 2;
                    fill(&mut buf, want, &mut eof)?;
                }
            }
        };
        // The taskunit keeps `buf`'s allocation (shrunk in place, no copy);
        // what follows the cut moves to a fresh buffer.
        let mut next = Vec::with_capacity(capacity.max(buf.len() - cut));
        next.extend_from_slice(&buf[(cut + 1).min(buf.len())..]);
        let mut unit = std::mem::replace(&mut buf, next);
        unit.truncate(cut);
        if !unit.is_empty() {
            unit.shrink_to_fit();
            emit(unit.into())?;
        }
    }
}

/// [`split_lines`] over bytes in memory (or mapped from a file) from
/// `*pos` on: the same taskunits, each a slice of `data`, none copied.
pub fn split_lines_shared(
    data: &SharedBytes,
    pos: &mut usize,
    max: usize,
    emit: &mut dyn FnMut(SharedBytes) -> Result<(), String>,
) -> Result<(), String> {
    let max = max.clamp(1, MAX_TASKUNIT);
    while *pos < data.len() {
        let rest = &data[*pos..];
        let window = rest.len().min(max + 1);
        let cut = match last_line_end(rest, max) {
            Some(nl) => nl,
            None if rest.len() <= max => rest.len(),
            // A line longer than `max`: it ends at the next newline.
            None => match memchr::memchr(b'\n', &rest[window..]) {
                Some(nl) => window + nl,
                None => rest.len(),
            },
        };
        if cut > MAX_TASKUNIT {
            return Err(line_too_long());
        }
        let unit = data.slice(*pos..*pos + cut);
        *pos = (*pos + cut + 1).min(data.len());
        if !unit.is_empty() {
            emit(unit)?;
        }
    }
    Ok(())
}

/// Where the taskunit at the start of `buf` ends if whole lines of at most
/// `max` bytes fit: at the last newline among the first `max + 1` bytes
/// (the newline itself is not part of the taskunit).
fn last_line_end(buf: &[u8], max: usize) -> Option<usize> {
    memchr::memrchr(b'\n', &buf[..buf.len().min(max + 1)])
}

fn line_too_long() -> String {
    format!("the input has a line longer than the {MAX_TASKUNIT}-byte taskunit limit")
}

/// What a split reads: a stream, or bytes already in memory or mapped from
/// a file, which the line split cuts into taskunits without copying them.
pub enum SplitInput {
    Stream(Box<dyn Read + Send>),
    Bytes { data: SharedBytes, pos: usize },
}

impl Read for SplitInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            SplitInput::Stream(r) => r.read(buf),
            SplitInput::Bytes { data, pos } => {
                let n = (&data[*pos..]).read(buf)?;
                *pos += n;
                Ok(n)
            }
        }
    }
}

/// Turn a failed call into a [`TaskError`], naming the cause.
fn classify(err: wasmtime::Error, store: &Store<GuestState>, limits: Limits) -> TaskError {
    let state = store.data();
    if state.limiter.exceeded {
        return TaskError::OutOfMemory(limits.memory);
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

/// Runs `process` for one module, reusing one instance across taskunits.
pub struct TaskRunner {
    env: Environment,
    component: Component,
    limits: Limits,
    instance: Option<(Store<GuestState>, Job)>,
    /// Bytes of the instance's stderr already handed out.
    stderr_seen: usize,
    /// What the last taskunit wrote to stderr.
    last_stderr: String,
}

impl TaskRunner {
    pub fn new(env: Environment, component: Component, limits: Limits) -> Self {
        TaskRunner {
            env,
            component,
            limits,
            instance: None,
            stderr_seen: 0,
            last_stderr: String::new(),
        }
    }

    /// What the last taskunit wrote to stderr (empty if nothing; after a
    /// trap it is part of the error instead).
    pub fn take_stderr(&mut self) -> String {
        std::mem::take(&mut self.last_stderr)
    }

    /// Keep the instance for the next taskunit, collecting what this one
    /// wrote to stderr. An instance whose stderr buffer is filling up is
    /// replaced, so a chatty guest never hits the buffer's end.
    fn keep(&mut self, store: Store<GuestState>, job: Job) {
        let all = store.data().stderr.contents();
        self.last_stderr =
            String::from_utf8_lossy(&all[self.stderr_seen.min(all.len())..]).into_owned();
        self.stderr_seen = all.len();
        if self.stderr_seen < STDERR_CAPTURE * 3 / 4 {
            self.instance = Some((store, job));
        } else {
            self.stderr_seen = 0;
        }
    }

    /// Process one taskunit.
    pub fn process(&mut self, unit: &[u8]) -> Result<Vec<u8>, TaskError> {
        let (mut store, job) = match self.instance.take() {
            Some(inst) => inst,
            None => self
                .env
                .instantiate(&self.component, self.limits, HostIo::None)?,
        };
        store.data_mut().deadline = Instant::now() + self.limits.time;
        let called = {
            let _running = self.env.running(self.limits.time);
            job.call_process(&mut store, unit)
        };
        match called {
            Ok(Ok(out)) if out.len() > self.limits.output => {
                self.keep(store, job);
                Err(TaskError::OutputTooLarge {
                    size: out.len(),
                    limit: self.limits.output,
                })
            }
            Ok(result) => {
                self.keep(store, job);
                result.map_err(TaskError::Guest)
            }
            // The instance trapped: drop it; the next taskunit gets a fresh one.
            Err(e) => {
                self.stderr_seen = 0;
                self.last_stderr.clear();
                Err(classify(e, &store, self.limits))
            }
        }
    }
}

/// What `split` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitOutcome {
    /// The job emitted this many taskunits itself.
    Emitted(u64),
    /// The job asked for the default split (one taskunit per line).
    Default,
}

/// Run the job's `split` over `input`, handing each taskunit to `emit`
/// (which may block, to keep memory bounded, and fails to stop the split).
/// For [`SplitOutcome::Default`] the caller splits by lines itself.
pub fn run_split(
    env: &Environment,
    component: &Component,
    limits: Limits,
    input: SplitInput,
    emit: Box<dyn FnMut(SharedBytes) -> Result<(), String> + Send>,
) -> Result<SplitOutcome, TaskError> {
    let io = HostIo::Split {
        input,
        emit,
        emitted: 0,
    };
    let (mut store, job) = env.instantiate(component, limits, io)?;
    store.data_mut().deadline = Instant::now() + limits.time;
    let result = {
        let _running = env.running(limits.time);
        job.call_split(&mut store)
    };
    let emitted = match &store.data().io {
        HostIo::Split { emitted, .. } => *emitted,
        _ => 0,
    };
    match result {
        Ok(Ok(true)) => Ok(SplitOutcome::Emitted(emitted)),
        Ok(Ok(false)) if emitted == 0 => Ok(SplitOutcome::Default),
        Ok(Ok(false)) => Err(TaskError::Guest(
            "split emitted taskunits and then asked for the default split".into(),
        )),
        Ok(Err(e)) => Err(TaskError::Guest(e)),
        Err(e) => Err(classify(e, &store, limits)),
    }
}

/// Run the job's `combine` over the results (in taskunit order). `None`
/// means the job asked for the default combine.
pub fn run_combine(
    env: &Environment,
    component: &Component,
    limits: Limits,
    results: Box<dyn Iterator<Item = Vec<u8>> + Send>,
) -> Result<Option<Vec<u8>>, TaskError> {
    let io = HostIo::Combine {
        results,
        output: Vec::new(),
        limit: limits.combined_output(),
    };
    let (mut store, job) = env.instantiate(component, limits, io)?;
    store.data_mut().deadline = Instant::now() + limits.time;
    let result = {
        let _running = env.running(limits.time);
        job.call_combine(&mut store)
    };
    let output = match &mut store.data_mut().io {
        HostIo::Combine { output, .. } => std::mem::take(output),
        _ => Vec::new(),
    };
    match result {
        Ok(Ok(true)) => Ok(Some(output)),
        Ok(Ok(false)) if output.is_empty() => Ok(None),
        Ok(Ok(false)) => Err(TaskError::Guest(
            "combine wrote output and then asked for the default combine".into(),
        )),
        Ok(Err(e)) => Err(TaskError::Guest(e)),
        Err(e) => Err(classify(e, &store, limits)),
    }
}

/// The default combine: results joined by newlines, in taskunit order.
pub fn default_combine(
    results: impl Iterator<Item = Vec<u8>>,
    limit: usize,
) -> Result<Vec<u8>, TaskError> {
    let mut out = Vec::new();
    for (i, r) in results.enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(&r);
        if out.len() > limit {
            return Err(TaskError::OutputTooLarge {
                size: out.len(),
                limit,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{split_lines, split_lines_shared};
    use crate::wire::SharedBytes;
    use proptest::prelude::*;

    /// Hands out the input a few bytes at a time, as a pipe might.
    struct Trickle<'a>(&'a [u8], usize);

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn lines(bytes: &[u8]) -> Vec<&[u8]> {
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect()
    }

    proptest! {
        #[test]
        fn split_lines_keeps_every_line_within_the_bound(
            line_lens in proptest::collection::vec(0usize..40, 0..200),
            max in 1usize..64,
            step in 1usize..100,
        ) {
            let mut input = Vec::new();
            for (i, len) in line_lens.iter().enumerate() {
                input.extend((0..*len).map(|k| b'a' + ((i + k) % 26) as u8));
                input.push(b'\n');
            }
            if line_lens.len() % 2 == 1 {
                input.pop(); // sometimes no final newline
            }
            let mut units = Vec::new();
            split_lines(&mut Trickle(&input, step), max, &mut |u| {
                units.push(u);
                Ok(())
            })
            .unwrap();
            let mut got = Vec::new();
            for u in &units {
                prop_assert!(!u.is_empty());
                // Over the bound only when it is one line.
                prop_assert!(u.len() <= max || !u.contains(&b'\n'), "unit {:?}", u);
                got.extend(lines(u));
            }
            prop_assert_eq!(got, lines(&input));
            // Cutting the same bytes in memory gives the same taskunits,
            // each a slice of the input rather than a copy.
            let shared = SharedBytes::from(input.clone());
            let mut sliced = Vec::new();
            split_lines_shared(&shared, &mut 0, max, &mut |u| {
                sliced.push(u);
                Ok(())
            })
            .unwrap();
            prop_assert_eq!(&sliced, &units);
            let within = shared.as_ptr_range();
            for u in &sliced {
                let r = u.as_ptr_range();
                prop_assert!(within.start <= r.start && r.end <= within.end, "not a slice of the input");
            }
        }
    }

    #[test]
    fn split_lines_fills_taskunits_up_to_the_bound() {
        let input = b"aaaa\nbbbb\ncccc\ndddd\n".repeat(3);
        let mut units = Vec::new();
        split_lines(&mut &input[..], 10, &mut |u| {
            units.push(u);
            Ok(())
        })
        .unwrap();
        assert_eq!(units.len(), 6, "{units:?}");
        assert!(
            units
                .iter()
                .all(|u| &u[..] == b"aaaa\nbbbb" || &u[..] == b"cccc\ndddd")
        );
    }

    #[test]
    fn split_lines_stops_when_emit_fails() {
        let input = b"one\ntwo\nthree\n";
        let mut calls = 0;
        let err = split_lines(&mut &input[..], 3, &mut |_| {
            calls += 1;
            Err("job cancelled".into())
        })
        .unwrap_err();
        assert_eq!((calls, err.as_str()), (1, "job cancelled"));
    }
}

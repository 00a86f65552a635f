//! The engine of a peer's sandbox ([`Sandbox`]): the wasmtime engine
//! and linker, the compiled-component cache (in memory and on disk, by
//! module hash), instantiation under limits, and the epoch ticker.
//!
//! Deadlines use epoch interruption: one ticker thread per [`Sandbox`]
//! bumps the engine epoch while guest code runs, every 1/64 of the
//! shortest time limit among the calls running (10 ms to 1 s), so a
//! deadline is kept to within about 1.6% of its limit; it sleeps when none
//! has run for a few ticks, so an idle peer stays quiet. Each tick takes a
//! core from a busy slot for a moment (on a loaded machine, after waiting
//! for the scheduler's next tick), hence no more ticks than that. The
//! deadline callback compares against a wall-clock deadline kept in the
//! store, which host calls that block (a split waiting for workers to take
//! its taskunits) push forward, so only time spent computing counts. A
//! guest waiting in WASI (a sleep) is out of epochs' reach, so WASI's
//! monotonic clock is linked again with every wait cut at the deadline
//! (see `guest::DeadlineClocks`); waiting counts as computing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use antnest_proto::{Limits, ModuleHash, TaskError};
use wasmtime::component::{Component, Instance, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi::p2::pipe::{MemoryOutputPipe, SinkOutputStream};

use crate::compile::Compiler;
use crate::guest::{
    ClocksUntil, DeadlineClocks, Exceeded, GuestState, HasSelf, HostIo, Job, JobPre, MemoryBudget,
    MemoryLimiter, STDERR_CAPTURE, classify,
};
use crate::job_files;

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

/// A job module ready to run: its compiled component and, for a module
/// that carries its job's files (see [`crate::job_files`]), those files.
/// Cheap to clone.
#[derive(Clone)]
pub struct Module {
    pub(crate) component: Component,
    pub(crate) files: Arc<[u8]>,
    /// For a module with job files, the hash of its code.
    pub(crate) code: Option<ModuleHash>,
}

impl Module {
    /// For a module that is code with job files appended, the hash of the
    /// code (compiled once for all the jobs that carry files on it).
    pub fn code(&self) -> Option<ModuleHash> {
        self.code
    }
}

/// How long an instantiation waits at most for the peer's memory budget
/// (held by other instances) before it fails as busy, trying again every
/// [`BUDGET_PAUSE`].
const BUDGET_WAIT: Duration = Duration::from_secs(10);
const BUDGET_PAUSE: Duration = Duration::from_millis(25);

/// The engine configuration of every sandbox (and of a compile in a
/// child process, whose output the parent loads).
pub(crate) fn engine_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    // A NaN's bits differ between CPUs unless canonicalized: with it, a
    // taskunit gives the same bytes on any peer (replicas compare equal).
    config.cranelift_nan_canonicalization(true);
    config
}

/// Compiled modules kept in memory: a peer that sees many jobs (or an
/// outsider announcing many modules) holds at most this many, the least
/// recently used dropped first (they stay in the disk cache).
const MAX_LOADED: usize = 32;

/// Compiled modules in memory, with when each was last used.
#[derive(Default)]
struct Loaded {
    modules: HashMap<ModuleHash, (Module, u64)>,
    clock: u64,
}

impl Loaded {
    fn get(&mut self, hash: &ModuleHash) -> Option<Module> {
        self.clock += 1;
        let now = self.clock;
        self.modules.get_mut(hash).map(|(m, used)| {
            *used = now;
            m.clone()
        })
    }

    /// Keep `module`; true if another was dropped to make room.
    fn insert(&mut self, hash: ModuleHash, module: Module) -> bool {
        self.clock += 1;
        self.modules.insert(hash, (module, self.clock));
        if self.modules.len() <= MAX_LOADED {
            return false;
        }
        let oldest = self
            .modules
            .iter()
            .min_by_key(|(_, (_, used))| *used)
            .map(|(h, _)| *h);
        if let Some(h) = oldest {
            self.modules.remove(&h);
        }
        true
    }
}

/// Where a module's bytes come from if they must be read (see [`Sandbox::component`]).
type Bytes<'a> = Box<dyn FnOnce() -> Option<Vec<u8>> + 'a>;

/// One per peer: the engine, the linker, and the compiled-module cache.
/// Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<EnvInner>,
}

struct EnvInner {
    engine: Engine,
    ticker: Ticker,
    linker: Linker<GuestState>,
    cache_dir: Option<PathBuf>,
    loaded: Mutex<Loaded>,
    /// The job files of modules kept for the native runtime, which does
    /// not compile them (see [`Sandbox::store_uncompiled`]).
    files: Mutex<HashMap<ModuleHash, Arc<[u8]>>>,
    /// Each component's imports resolved against the linker once
    /// (`instantiate_pre` type-checks every WASI import, ~50 µs), keyed by
    /// the address of its code, which stays put while the entry holds it.
    ready: Mutex<HashMap<usize, JobPre<GuestState>>>,
    /// One gate per module being loaded, so that two threads wanting the
    /// same module (a job's submit and a worker slot, say) compile it once.
    loading: Mutex<HashMap<ModuleHash, Arc<Mutex<()>>>>,
    /// Files of the disk cache checked against their hash in this
    /// process, by inode and size (see [`Sandbox::stored_module`]).
    verified: Mutex<HashMap<ModuleHash, (u64, u64)>>,
    /// Memory of every instance of this peer (see [`Sandbox::set_max_memory`]).
    budget: Arc<MemoryBudget>,
    /// Compiles in a child process, bounded, if set (see
    /// [`Sandbox::compile_in_child`]); else in this process.
    compiler: Mutex<Option<Arc<Compiler>>>,
    /// Bytes the disk cache may hold (see [`Sandbox::set_cache_max`]).
    cache_max: AtomicU64,
    compiled: AtomicU64,
    disk_hits: AtomicU64,
    memory_hits: AtomicU64,
}

impl Sandbox {
    /// Build the engine and start its epoch ticker. `cache_dir` keeps module
    /// bytes and compiled artifacts between runs; `None` keeps them in memory only.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, LoadError> {
        let engine = Engine::new(&engine_config()).map_err(|e| LoadError::InvalidModule {
            hash: ModuleHash::of(b""),
            reason: format!("engine: {e}"),
        })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).expect("WASI links once");
        // WASI's monotonic clock again, with waits cut at the deadline.
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::clocks::monotonic_clock::add_to_linker::<
            GuestState,
            DeadlineClocks,
        >(&mut linker, ClocksUntil::of)
        .expect("the clock links");
        linker.allow_shadowing(false);
        Job::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut linker, |s| s)
            .expect("host interface links once");
        if let Some(dir) = &cache_dir {
            private_dir(dir).map_err(|source| LoadError::Cache {
                path: dir.clone(),
                source,
            })?;
        }
        let ticker = Ticker::start(&engine);
        Ok(Sandbox {
            inner: Arc::new(EnvInner {
                engine,
                ticker,
                linker,
                cache_dir,
                loaded: Mutex::new(Loaded::default()),
                files: Mutex::new(HashMap::new()),
                ready: Mutex::new(HashMap::new()),
                loading: Mutex::new(HashMap::new()),
                verified: Mutex::new(HashMap::new()),
                budget: Arc::new(MemoryBudget::new()),
                cache_max: AtomicU64::new(u64::MAX),
                compiler: Mutex::new(None),
                compiled: AtomicU64::new(0),
                disk_hits: AtomicU64::new(0),
                memory_hits: AtomicU64::new(0),
            }),
        })
    }

    /// Bound the memory all instances of this peer hold together, every
    /// slot's running and cached ones: a guest growing past it fails its
    /// taskunit with [`TaskError::Busy`] (to be run again elsewhere or
    /// later). Unbounded until set.
    pub fn set_max_memory(&self, bytes: usize) {
        self.inner.budget.set_max(bytes);
    }

    /// Whether instances hold over three quarters of the peer's memory
    /// budget: time to drop cached instances rather than keep them.
    /// How many times an instance's growth was refused for want of the
    /// peer's budget: when it moves, instances kept idle should go.
    pub fn memory_refusals(&self) -> u64 {
        self.inner.budget.refused()
    }

    pub fn memory_tight(&self) -> bool {
        let b = &self.inner.budget;
        b.used() > b.max() / 4 * 3
    }

    /// Compile modules in a child process run as `compiler` says, bounded
    /// in time and memory (see [`crate::compile`]), instead of in this
    /// process with no bound.
    pub fn compile_in_child(&self, compiler: Compiler) {
        *self.inner.compiler.lock().unwrap() = Some(Arc::new(compiler));
    }

    /// Bound the disk cache (modules, compiled artifacts, jobs' files):
    /// past `bytes`, the least recently used files are removed, never
    /// those of the module just kept. Unbounded until set.
    pub fn set_cache_max(&self, bytes: u64) {
        self.inner.cache_max.store(bytes, Ordering::Relaxed);
    }

    /// The bound set by [`Self::set_max_memory`].
    pub fn max_memory(&self) -> usize {
        self.inner.budget.max()
    }

    /// Bytes all instances of this peer hold (memories and tables).
    pub fn memory_used(&self) -> usize {
        self.inner.budget.used()
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

    /// Where a module that carries job files keeps them: the hash of its
    /// code (kept as a module of its own) and the files' section.
    fn files_path(&self, hash: &ModuleHash) -> Option<PathBuf> {
        self.inner
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{hash}.files")))
    }

    /// The module's bytes, if this peer has them on disk, intact. A copy
    /// that does not match its hash (a torn or damaged file) is removed,
    /// so the module is fetched again.
    pub fn stored_module(&self, hash: &ModuleHash) -> Option<Vec<u8>> {
        let (path, bytes) = self.read_module(hash)?;
        // A file checked once is not hashed again (36 MB of Python runner
        // take ~50 ms) while it is the same file of the same size: files
        // are replaced whole (`write_atomic`), never written in place.
        let id = std::fs::metadata(&path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            (m.ino(), m.len())
        });
        let mut verified = self.inner.verified.lock().unwrap();
        if id.is_some() && verified.get(hash) == id.as_ref() {
            return Some(bytes);
        }
        drop(verified);
        if ModuleHash::of(&bytes) == *hash {
            verified = self.inner.verified.lock().unwrap();
            if verified.len() >= 256 {
                verified.clear();
            }
            if let Some(id) = id {
                verified.insert(*hash, id);
            }
            return Some(bytes);
        }
        tracing::warn!(%hash, path = %path.display(), "cached module damaged: removed, to be fetched again");
        let _ = std::fs::remove_file(&path);
        None
    }

    /// For a module with job files kept on disk: the hash of its code and
    /// the bytes that follow the code (not checked: a worker checks the
    /// module it puts together against the module's hash).
    pub fn stored_files(&self, hash: &ModuleHash) -> Option<(ModuleHash, Vec<u8>)> {
        let mut record = std::fs::read(self.files_path(hash)?).ok()?;
        let code = ModuleHash(record.get(..32)?.try_into().ok()?);
        record.drain(..32);
        self.touch(hash);
        Some((code, record))
    }

    /// The size of the module's bytes kept on disk, if they are (not
    /// read, not checked).
    pub fn stored_size(&self, hash: &ModuleHash) -> Option<u64> {
        if let Some(m) = self
            .module_path(hash)
            .and_then(|p| std::fs::metadata(p).ok())
        {
            return Some(m.len());
        }
        let mut record = std::fs::File::open(self.files_path(hash)?).ok()?;
        let files = record.metadata().ok()?.len();
        let mut code = [0u8; 32];
        std::io::Read::read_exact(&mut record, &mut code).ok()?;
        let code = self.stored_size(&ModuleHash(code))?;
        Some(code + files.checked_sub(32)?)
    }

    /// The module's bytes as kept on disk, and the file they came from.
    fn read_module(&self, hash: &ModuleHash) -> Option<(PathBuf, Vec<u8>)> {
        let path = self.module_path(hash)?;
        if let Ok(bytes) = std::fs::read(&path) {
            self.touch(hash);
            return Some((path, bytes));
        }
        let path = self.files_path(hash)?;
        let record = std::fs::read(&path).ok()?;
        let (code, section) = record.split_at_checked(32)?;
        let mut bytes = self.stored_module(&ModuleHash(code.try_into().ok()?))?;
        bytes.extend_from_slice(section);
        Some((path, bytes))
    }

    /// Keep the module's bytes on disk (so this peer can serve them to
    /// others). A module that carries job files is kept as its code (once
    /// for all the jobs that share it) and its files.
    pub fn store_module(&self, hash: &ModuleHash, bytes: &[u8]) -> Result<(), LoadError> {
        if let Some((code, _)) = job_files::split(bytes) {
            return self.store_with_files(hash, &ModuleHash::of(code), bytes, code.len());
        }
        match self.module_path(hash) {
            Some(path) if !path.exists() => write_atomic(&path, bytes),
            _ => Ok(()),
        }
    }

    /// [`Self::store_module`] for a module with job files, whose first
    /// `code_len` bytes are its code, of hash `code_hash`.
    fn store_with_files(
        &self,
        hash: &ModuleHash,
        code_hash: &ModuleHash,
        bytes: &[u8],
        code_len: usize,
    ) -> Result<(), LoadError> {
        let (code, section) = bytes.split_at(code_len);
        self.store_module(code_hash, code)?;
        match self.files_path(hash) {
            Some(path) if !path.exists() => {
                write_atomic(&path, &[&code_hash.0[..], section].concat())
            }
            _ => Ok(()),
        }
    }

    /// Keep a module that carries job files (see [`crate::job_files`])
    /// without compiling it, for the native runtime: its bytes on disk,
    /// its files in memory. `Ok(None)` for a module without files;
    /// an error if `bytes` do not hash to `hash`.
    pub fn store_uncompiled(
        &self,
        hash: &ModuleHash,
        bytes: &[u8],
    ) -> Result<Option<Arc<[u8]>>, LoadError> {
        if ModuleHash::of(bytes) != *hash {
            return Err(LoadError::InvalidModule {
                hash: *hash,
                reason: "bytes do not match the module hash".into(),
            });
        }
        let Some((code, files)) = job_files::split(bytes) else {
            return Ok(None);
        };
        let code_hash = ModuleHash::of(code);
        self.store_with_files(hash, &code_hash, bytes, code.len())?;
        self.evict(&[*hash, code_hash]);
        Ok(Some(self.keep_files(hash, files)))
    }

    /// The job files of module `hash`, without compiling it: from memory,
    /// else from the module kept on disk (checked against its hash).
    /// `None` if this peer does not have the module, or it has no files.
    pub fn job_files(&self, hash: &ModuleHash) -> Option<Arc<[u8]>> {
        if let Some(files) = self.files_in_memory(hash) {
            return Some(files);
        }
        let bytes = self.stored_module(hash)?;
        let (_, files) = job_files::split(&bytes)?;
        Some(self.keep_files(hash, files))
    }

    /// [`Self::job_files`] if they are in memory (never blocks for long).
    pub fn files_in_memory(&self, hash: &ModuleHash) -> Option<Arc<[u8]>> {
        let loaded = self.inner.loaded.lock().unwrap().get(hash);
        if let Some(m) = loaded.filter(|m| !m.files.is_empty()) {
            return Some(m.files);
        }
        self.inner.files.lock().unwrap().get(hash).cloned()
    }

    fn keep_files(&self, hash: &ModuleHash, files: &[u8]) -> Arc<[u8]> {
        let files: Arc<[u8]> = Arc::from(files);
        let mut kept = self.inner.files.lock().unwrap();
        // Jobs' files are small, but a peer runs many jobs in its life.
        if kept.len() >= 64 {
            kept.clear();
        }
        kept.insert(*hash, files.clone());
        files
    }

    /// Whether the compiled component is available without compiling.
    pub fn is_compiled(&self, hash: &ModuleHash) -> bool {
        self.inner.loaded.lock().unwrap().modules.contains_key(hash)
            || self.artifact_path(hash).is_some_and(|p| p.exists())
    }

    /// The compiled component for `hash`: from memory, from the artifact
    /// cache, or compiled from `bytes` (which must hash to `hash`).
    /// Blocks for the whole compile; call it off the async runtime.
    pub fn component(
        &self,
        hash: &ModuleHash,
        bytes: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Result<Module, LoadError> {
        self.component_of(hash, Box::new(bytes))
    }

    /// [`Self::component`], not generic: loading a module with job files
    /// loads its code through here again.
    fn component_of(&self, hash: &ModuleHash, bytes: Bytes<'_>) -> Result<Module, LoadError> {
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
    pub fn loaded(&self, hash: &ModuleHash) -> Option<Module> {
        let c = self.inner.loaded.lock().unwrap().get(hash)?;
        self.inner.memory_hits.fetch_add(1, Ordering::Relaxed);
        Some(c)
    }

    /// `component` past the memory cache: from disk or compiled.
    fn load(&self, hash: &ModuleHash, bytes: Bytes<'_>) -> Result<Module, LoadError> {
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
                self.touch(hash);
                return Ok(self.remember(hash, c, Arc::from([]), None));
            }
        }
        // Bytes from the disk are checked against their hash as they are read.
        let bytes = match bytes() {
            Some(b) if ModuleHash::of(&b) == *hash => b,
            Some(_) => return Err(invalid("bytes do not match the module hash".into())),
            None => self
                .stored_module(hash)
                .ok_or_else(|| invalid("module bytes not available".into()))?,
        };
        if let Some((code, files)) = job_files::split(&bytes) {
            // The code is a module of its own, compiled once for every job
            // that carries its files on it.
            let code_hash = ModuleHash::of(code);
            let compiled = self.component_of(&code_hash, Box::new(|| Some(code.to_vec())))?;
            self.store_with_files(hash, &code_hash, &bytes, code.len())?;
            self.evict(&[*hash, code_hash]);
            return Ok(self.remember(hash, compiled.component, Arc::from(files), Some(code_hash)));
        }
        let compiler = self.inner.compiler.lock().unwrap().clone();
        let serialized = match compiler {
            Some(child) => child.compile(&bytes).map_err(invalid)?,
            None => {
                // Cranelift compiles a component's functions in parallel on
                // rayon's pool; a pool of this compile's own keeps a small
                // module from queueing behind a big one that another thread
                // compiles (the kernel shares the cores between the two
                // pools' threads).
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("antnest-compile-{i}"))
                    .build()
                    .map_err(|e| invalid(format!("compile threads: {e}")))?;
                pool.install(|| self.inner.engine.precompile_component(&bytes))
                    .map_err(|e| invalid(format!("{e:#}")))?
            }
        };
        self.inner.compiled.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the bytes were produced just now by this engine's
        // configuration, in this process or in a child running this same
        // program (`crate::compile`); wasmtime checks that they match.
        let component = unsafe { Component::deserialize(&self.inner.engine, &serialized) }
            .map_err(|e| invalid(format!("{e:#}")))?;
        if let Some(path) = artifact {
            write_atomic(&path, &serialized)?;
        }
        self.store_module(hash, &bytes)?;
        self.evict(&[*hash]);
        Ok(self.remember(hash, component, Arc::from([]), None))
    }

    /// Mark a module's files in the disk cache as just used (the cache
    /// drops the least recently used first); a failure only makes them
    /// look older.
    fn touch(&self, hash: &ModuleHash) {
        let paths = [
            self.module_path(hash),
            self.artifact_path(hash),
            self.files_path(hash),
        ];
        for path in paths.into_iter().flatten() {
            if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
        }
    }

    /// Remove the least recently used files of the disk cache until it
    /// holds at most its bound, keeping those of `keep`. Only the cache's
    /// own files count (the Python runner a submit builds is elsewhere).
    fn evict(&self, keep: &[ModuleHash]) {
        let max = self.inner.cache_max.load(Ordering::Relaxed);
        let Some(dir) = self.inner.cache_dir.as_ref().filter(|_| max < u64::MAX) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let path = e.path();
                let ext = path.extension()?.to_str()?;
                if !matches!(ext, "wasm" | "cwasm" | "files") {
                    return None;
                }
                let meta = e.metadata().ok().filter(|m| m.is_file())?;
                Some((meta.modified().ok()?, meta.len(), path))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        if total <= max {
            return;
        }
        let kept: Vec<String> = keep.iter().map(|h| h.to_string()).collect();
        files.sort();
        for (_, len, path) in files {
            if total <= max {
                break;
            }
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if kept.iter().any(|k| name.starts_with(k.as_str())) {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                tracing::debug!(path = %path.display(), "module cache full: least recently used file removed");
            }
        }
    }

    fn remember(
        &self,
        hash: &ModuleHash,
        component: Component,
        files: Arc<[u8]>,
        code: Option<ModuleHash>,
    ) -> Module {
        let module = Module {
            component,
            files,
            code,
        };
        let mut loaded = self.inner.loaded.lock().unwrap();
        if loaded.insert(*hash, module.clone()) {
            // Linked components of modules no longer in memory go too (a
            // slot still running one links it again).
            let kept: std::collections::HashSet<usize> = loaded
                .modules
                .values()
                .map(|(m, _)| m.component.image_range().start as usize)
                .collect();
            self.inner
                .ready
                .lock()
                .unwrap()
                .retain(|key, _| kept.contains(key));
        }
        module
    }

    pub(crate) fn instantiate(
        &self,
        module: &Module,
        limits: Limits,
        io: HostIo,
    ) -> Result<(Store<GuestState>, Job), TaskError> {
        self.instantiate_seeded(module, limits, io, [0; 32])
    }

    /// [`Self::instantiate`], with `seed` for the WASI random numbers of a
    /// deterministic job ([`Limits::deterministic`]; unused otherwise).
    pub(crate) fn instantiate_seeded(
        &self,
        module: &Module,
        limits: Limits,
        io: HostIo,
        seed: [u8; 32],
    ) -> Result<(Store<GuestState>, Job), TaskError> {
        // The job's exports found once per module (`JobPre`), not by name
        // at every instantiation.
        self.instantiate_with(module, limits, io, seed, |pre, store| {
            pre.instantiate(store)
        })
    }

    /// An instance of `module`, for calls beyond the job's own world (a
    /// Python runner's `render`).
    pub(crate) fn instance(
        &self,
        module: &Module,
        limits: Limits,
        io: HostIo,
    ) -> Result<(Store<GuestState>, Instance), TaskError> {
        self.instantiate_with(module, limits, io, [0; 32], |pre, store| {
            pre.instance_pre().instantiate(store)
        })
    }

    /// A store for `module` under `limits`, and what `make` instantiates
    /// in it.
    fn instantiate_with<T>(
        &self,
        module: &Module,
        limits: Limits,
        mut io: HostIo,
        seed: [u8; 32],
        make: impl Fn(&JobPre<GuestState>, &mut Store<GuestState>) -> wasmtime::Result<T>,
    ) -> Result<(Store<GuestState>, T), TaskError> {
        let pre = self.ready(&module.component)?;
        let waiting_since = Instant::now();
        loop {
            let mut store = self.store(module, limits, io, seed);
            let made = {
                let _running = self.running(limits.time);
                make(&pre, &mut store)
            };
            let e = match made {
                Ok(made) => return Ok((store, made)),
                Err(e) => e,
            };
            match store.data().limiter.exceeded {
                // The peer's budget is held by other instances, running or
                // kept idle (those go when their slots see the refusal):
                // wait a little for it, the split's input or the
                // combine's results kept for the next try.
                Some(Exceeded::Peer) if waiting_since.elapsed() < BUDGET_WAIT => {
                    io = store.into_data().io;
                    std::thread::sleep(BUDGET_PAUSE);
                }
                // Its first memories may not fit the limits.
                Some(_) => return Err(classify(e, &store, limits)),
                None => return Err(TaskError::Load(format!("instantiate: {e:#}"))),
            }
        }
    }

    /// A store for an instance of `module` under `limits`.
    fn store(
        &self,
        module: &Module,
        limits: Limits,
        io: HostIo,
        seed: [u8; 32],
    ) -> Store<GuestState> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let mut wasi = WasiCtx::builder();
        wasi.stdout(SinkOutputStream).stderr(stderr.clone());
        if limits.deterministic {
            crate::guest::deterministic(&mut wasi, seed);
        }
        let wasi = wasi.build();
        let state = GuestState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(limits.memory, self.inner.budget.clone()),
            stderr,
            deadline: Instant::now() + limits.time,
            io,
            files: module.files.clone(),
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
        store
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
    pub(crate) fn running(&self, limit: Duration) -> Running<'_> {
        self.inner.ticker.enter(limit)
    }
}

/// Make `dir` (if missing) private to this user. Compiled artifacts are
/// loaded from it with wasmtime's unchecked `deserialize_file`, so no one
/// else may write there: a directory of this user's that is open to
/// others is closed (mode 0700), and one that belongs to someone else is
/// an error.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, not by this user (uid {me}): compiled code is loaded from it, so it must be this user's own (choose another with --cache-dir)",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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

pub(crate) struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    antnest_proto::write_atomic(path, bytes).map_err(|source| LoadError::Cache {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::Sandbox;

    #[test]
    fn the_cache_directory_is_private_to_its_user() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/b");
        Sandbox::new(Some(fresh.clone())).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        Sandbox::new(Some(open.clone())).unwrap();
        assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o777, 0o700);
        // Someone else's (only root can make one here).
        let theirs = root.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        let path = std::ffi::CString::new(theirs.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; chown has no other preconditions.
        if unsafe { libc::chown(path.as_ptr(), 65534, 65534) } == 0 {
            let err = Sandbox::new(Some(theirs))
                .err()
                .expect("someone else's cache refused");
            assert!(err.to_string().contains("uid 65534"), "{err}");
        }
    }
}

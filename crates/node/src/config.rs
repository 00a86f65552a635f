//! How a peer runs: [`PeerConfig`], built by the binary from its
//! arguments and config file, and the default cache directory.

use std::path::PathBuf;
use std::time::Duration;

use antnest_proto::Limits;
use antnest_sandbox::NativePython;
use libp2p::PeerId;

use crate::net::NetConfig;

/// How a peer runs.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub net: NetConfig,
    /// Taskunits this peer runs at once (default: one per core).
    pub slots: usize,
    /// The most any job may use per taskunit on this peer.
    pub limits: Limits,
    /// Where modules and compiled artifacts are kept; `None`: memory only.
    pub cache_dir: Option<PathBuf>,
    /// How long a worker holds leased taskunits before they are re-issued.
    pub lease: Duration,
    /// How often a master re-announces a job that still has work.
    pub announce_every: Duration,
    /// Work only on jobs whose master is one of these; `None`: any master.
    pub allowed_masters: Option<std::collections::HashSet<PeerId>>,
    /// Jobs this peer is master of at once; more submissions are refused.
    pub max_jobs: usize,
    /// Python taskunits may run in native CPython here (see
    /// `antnest_sandbox::native`); `None`: only in wasm.
    pub native_python: Option<NativeConfig>,
    /// Bytes all wasm instances of this peer may hold together, running
    /// and cached (see `Sandbox::set_max_memory`).
    pub max_memory: usize,
    /// Bytes the disk cache of modules and compiled artifacts may hold.
    pub cache_max: u64,
    /// Compile modules in a child process, bounded in time and memory;
    /// `None`: in this process, unbounded (tests and benchmarks that have
    /// no `antnest` program to run).
    pub compiler: Option<antnest_sandbox::Compiler>,
}

/// The native Python runtime on a peer.
#[derive(Debug, Clone)]
pub struct NativeConfig {
    pub python: NativePython,
    /// Other masters' jobs too, not only this peer's own: only for a mesh
    /// whose masters are trusted (a mesh key, or an allowlist of masters).
    pub others: bool,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            net: NetConfig::default(),
            slots: std::thread::available_parallelism().map_or(1, |n| n.get()),
            limits: Limits::default(),
            cache_dir: default_cache_dir(),
            lease: Duration::from_secs(30),
            announce_every: Duration::from_millis(500),
            allowed_masters: None,
            max_jobs: 8,
            native_python: None,
            max_memory: default_max_memory(),
            cache_max: DEFAULT_CACHE_MAX_MB << 20,
            compiler: None,
        }
    }
}

/// The disk cache's default bound, in MiB: antnest's Python runner and its
/// compiled code take about 90 MB, a Rust job a few.
pub const DEFAULT_CACHE_MAX_MB: u64 = 4096;

/// Half of this machine's memory (4 GiB where it cannot be read).
pub fn default_max_memory() -> usize {
    // SAFETY: sysconf only reads system values.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page > 0 {
        (pages as usize).saturating_mul(page as usize) / 2
    } else {
        4 << 30
    }
}

/// `$ANTNEST_CACHE`, else `$XDG_CACHE_HOME/antnest`, else `~/.cache/antnest`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("ANTNEST_CACHE") {
        return Some(d.into());
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("antnest"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/antnest"))
}

//! The command line as typed (clap derive only). `main.rs` turns these into
//! validated configurations before doing any I/O.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;

#[derive(Debug, Parser)]
#[command(
    name = "antnest",
    version,
    about = "A peer-to-peer compute mesh for split/process/combine jobs in WebAssembly"
)]
pub(crate) struct Cli {
    /// Threads for networking and coordination. Taskunits run on threads
    /// of their own (one per slot), so this stays small: one per 4 cores,
    /// at least one. A second thread on a 2-core machine only takes turns
    /// with the slots.
    #[arg(long, global = true, env = "ANTNEST_NET_THREADS", value_name = "N")]
    pub(crate) net_threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a peer: join the mesh, work on announced jobs, accept local submissions.
    Peer(PeerArgs),
    /// Run a job (this machine's peer is its master) and print the result.
    Submit(SubmitArgs),
    /// List the mesh as the local peer sees it.
    Peers(ControlArgs),
    /// List the jobs the local peer is master of.
    Jobs(ControlArgs),
    /// Cancel a job the local peer is master of.
    Cancel(CancelArgs),
    /// Print shell completions (bash, zsh, fish, ...).
    Completions { shell: clap_complete::Shell },
    /// Compile a component from stdin to stdout (a peer runs this in a
    /// child process, to bound a compile in time and memory).
    #[command(hide = true)]
    CompileModule,
}

#[derive(Debug, Args)]
pub(crate) struct CancelArgs {
    pub(crate) job: antnest_proto::JobId,
    #[command(flatten)]
    pub(crate) control: ControlArgs,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct NetArgs {
    /// Address to listen on (repeatable). Default for `peer`: port 4001 on
    /// every interface if it is free, else a random port; for `submit`'s own
    /// peer: a random port.
    #[arg(long, value_name = "MULTIADDR")]
    pub(crate) listen: Vec<Multiaddr>,
    /// Peer to dial at start (repeatable), e.g. /ip4/10.0.0.5/tcp/4001.
    #[arg(long, value_name = "MULTIADDR")]
    pub(crate) bootstrap: Vec<Multiaddr>,
    /// Bootstrap config file (`{"masters":[{"ip":..,"port":..}]}`; a master
    /// without a port is at 4001). Default: config/<hostname>-slave-config.json
    /// and config/<hostname>-peer-config.json, those that exist.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Taskunits run at once on this peer. Default: one per core.
    #[arg(long)]
    pub(crate) slots: Option<usize>,
    /// Turn off mDNS LAN discovery.
    #[arg(long)]
    pub(crate) no_mdns: bool,
    /// Private mesh: only peers holding this pre-shared key can connect.
    /// QUIC is off with a mesh key: the pre-shared key covers TCP only.
    #[arg(long, value_name = "FILE")]
    pub(crate) mesh_key: Option<PathBuf>,
    /// TCP only: no QUIC listener or dials (QUIC listens on UDP at the
    /// TCP port's number).
    #[arg(long)]
    pub(crate) no_quic: bool,
    /// Serve as a relay for peers that cannot be reached directly (behind
    /// NAT): run it on a peer with a public address.
    #[arg(long)]
    pub(crate) relay: bool,
    /// Hold a reservation on this relay (repeatable), e.g.
    /// /ip4/203.0.113.5/tcp/4001/p2p/12D3..: peers reach this one through
    /// it, then directly once hole punching succeeds.
    #[arg(long, value_name = "MULTIADDR")]
    pub(crate) relay_via: Vec<Multiaddr>,
    /// Where modules and compiled artifacts are cached. Default: ~/.cache/antnest.
    #[arg(long, value_name = "DIR", env = "ANTNEST_CACHE")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Keep this peer's identity (its peer id) in FILE, created if missing.
    #[arg(long, value_name = "FILE")]
    pub(crate) identity: Option<PathBuf>,
    /// Work only on jobs from this master (repeatable). Default: any master.
    #[arg(long, value_name = "PEER_ID")]
    pub(crate) allow_master: Vec<libp2p::PeerId>,
    /// Jobs this peer may be master of at once.
    #[arg(long, default_value_t = 8)]
    pub(crate) max_jobs: usize,
    /// Memory, in MiB, that all wasm instances of this peer may hold
    /// together (every slot's running and cached ones). A taskunit that
    /// would grow past it fails on this peer as "worker busy" and is run
    /// again elsewhere. Default: half of this machine's memory.
    #[arg(long, value_name = "MIB")]
    pub(crate) max_memory: Option<usize>,
    /// MiB the cache of modules and compiled code (--cache-dir) may hold;
    /// past it the least recently used are removed.
    #[arg(long, value_name = "MIB", default_value_t = antnest_node::config::DEFAULT_CACHE_MAX_MB)]
    pub(crate) cache_max_mb: u64,
    /// Time a module's compile may take (it runs in a child process,
    /// stopped past this), e.g. 300s.
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    pub(crate) compile_timeout: Duration,
    /// Memory a module's compile may use, in MiB (an address-space cap on
    /// its child process).
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub(crate) compile_memory_mb: u64,
    /// Run Python jobs' taskunits in this machine's own CPython (native
    /// speed, its installed packages such as numpy) instead of wasm, each
    /// process contained by bubblewrap (`bwrap`): no network, the
    /// filesystem read-only, a private /tmp, the cache folder hidden. Jobs
    /// of other masters only with --mesh-key or --allow-master, since
    /// their code runs natively here; a submit's own peer runs its own
    /// job so.
    #[arg(long)]
    pub(crate) allow_native_python: bool,
    /// The CPython the native runtime starts.
    #[arg(long, value_name = "CMD", default_value = "python3")]
    pub(crate) native_python: String,
    /// Lease on handed-out taskunits before they are re-issued, e.g. 30s.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub(crate) lease: Duration,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct ControlArgs {
    /// The local peer's control socket. Default: $XDG_RUNTIME_DIR/antnest.sock or /tmp/antnest-$USER.sock.
    #[arg(long, value_name = "PATH", env = "ANTNEST_CONTROL")]
    pub(crate) control: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct PeerArgs {
    #[command(flatten)]
    pub(crate) net: NetArgs,
    /// Serve a live web page, JSON status and Prometheus /metrics on this
    /// address, e.g. 127.0.0.1:8080 (port 0 picks one; printed at start).
    #[arg(long, value_name = "ADDR")]
    pub(crate) ui: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub(crate) control: ControlArgs,
}

// One field per flag of `antnest submit`: more than a dozen, as the
// command has that many.
#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// The job: a .wasm component, a Rust job crate directory, or a .py file.
    pub(crate) job: PathBuf,
    /// Input file, or - for stdin (the default when stdin is not a terminal).
    #[arg(long, short)]
    pub(crate) input: Option<PathBuf>,
    /// Write the result here instead of stdout.
    #[arg(long, short)]
    pub(crate) output: Option<PathBuf>,
    /// Write job figures as JSON here.
    #[arg(long, value_name = "FILE")]
    pub(crate) stats_json: Option<PathBuf>,
    /// Compute time allowed per taskunit, e.g. 500ms, 10s.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub(crate) task_timeout: Duration,
    /// Memory a taskunit's instance may use, in MiB.
    #[arg(long, default_value_t = 512)]
    pub(crate) memory_mb: usize,
    /// Largest result of one taskunit, in MiB.
    #[arg(long, default_value_t = 8)]
    pub(crate) max_output_mb: usize,
    /// Same bytes from a taskunit on every peer, every time: each taskunit
    /// runs in a fresh instance whose WASI random numbers are seeded from
    /// the taskunit (its index and bytes; Python's `random` too) and whose
    /// clocks read the same on every peer (the wall clock at 2026-01-01,
    /// a monotonic clock that ticks 1 µs per reading). For jobs that draw
    /// random numbers or read the time, with --replicate or --verify.
    /// Slower: an instance per taskunit.
    #[arg(long)]
    pub(crate) deterministic: bool,
    /// Attempts per taskunit before it counts as failed.
    #[arg(long, default_value_t = 3)]
    pub(crate) attempts: u32,
    /// Combine the successful results even if some taskunits failed.
    #[arg(long)]
    pub(crate) keep_going: bool,
    /// Continue an earlier job whose master crashed, from its journal
    /// (give the same JOB and input).
    #[arg(long, value_name = "JOB_ID")]
    pub(crate) resume: Option<antnest_proto::JobId>,
    /// Run each taskunit on K distinct peers and compare the results;
    /// a mismatch is reported and the taskunit run again. Needs K peers.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub(crate) replicate: u8,
    /// Run this share (0 to 1) of other peers' results again on this
    /// peer's own slots before taking them; a worker caught with a wrong
    /// result is refused and all its results are run again. Default: 0.02
    /// on an open mesh (no --mesh-key, no --allow-master), else 0.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub(crate) verify: Option<f64>,
    /// The job's share of every peer's slots against other jobs' (1 to
    /// 1000): a peer running a job of weight 3 and one of weight 1 gives
    /// them three quarters and one quarter of its slot time; equal jobs
    /// share equally, the master's own slots included.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) weight: u32,
    /// Print each taskunit's result (a line each) as it arrives, instead of
    /// the combined output.
    #[arg(long)]
    pub(crate) stream: bool,
    /// Print the outcome as JSON (output, stats, failures) on stdout.
    #[arg(long, conflicts_with = "stream")]
    pub(crate) json: bool,
    /// No progress on stderr.
    #[arg(long, short)]
    pub(crate) quiet: bool,
    /// Don't use a running local peer; run this job in a peer of its own.
    #[arg(long)]
    pub(crate) standalone: bool,
    /// Where a Python job's taskunits run: `wasm` (everywhere), `native`
    /// (only on peers with --allow-native-python, in their own CPython),
    /// or `auto` (native where a peer allows it, wasm elsewhere). The
    /// results are the same.
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(antnest_proto::Runtime))]
    pub(crate) runtime: antnest_proto::Runtime,
    /// A folder of pure-Python packages a Python job imports (repeatable),
    /// e.g. one made by `pip install --target DIR`; bundled into the job.
    /// Modules and packages beside the job file are bundled anyway.
    #[arg(long, value_name = "DIR")]
    pub(crate) python_path: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) control: ControlArgs,
    /// Used when no local peer runs (or with --standalone).
    #[command(flatten)]
    pub(crate) net: NetArgs,
}

/// `250ms`, `2s`, `5m`, or plain seconds.
/// A share from 0 to 1.
pub(crate) fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        Ok(_) => Err(format!("{s:?} is not between 0 and 1")),
        Err(e) => Err(format!("{s:?} is not a number: {e}")),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m or h)")),
    };
    // Deadlines are instants this far ahead: bounded, so none overflows.
    const MAX: Duration = Duration::from_secs(30 * 24 * 3600);
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= MAX => Ok(d),
        _ => Err(format!("duration {s:?} is out of range (at most 30 days)")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_and_out_of_range_ones_are_refused() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["99999999999999999999s", "31d", "-1s", "nan", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }
}

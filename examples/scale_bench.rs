//! How the mesh scales with its number of peers: N one-slot peer processes,
//! each in a network namespace of its own on one bridge (needs root),
//! finding each other by mDNS alone; a job submitted from the last peer.
//!
//! ```sh
//! cargo build --release --bin antnest --example scale_bench
//! target/release/examples/scale_bench --peers 10,30,100
//! ```
//!
//! For each N it prints: how long until every peer had a connection, the
//! bytes per second each peer receives with no job (pings, gossip
//! heartbeats, mDNS) and while a job runs, the time from submit until every
//! other peer had asked the master for work (it reached them all), the
//! share of peers that worked, the job's wall time against the ideal for
//! this machine (the same taskunits' single-thread time over its cores),
//! and the master's CPU time and RSS growth per worker.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use antnest_proto::control::{self, ControlReply, ControlRequest};
use anyhow::{Context, Result, bail};
use clap::Parser;

#[path = "common/bridge.rs"]
mod bridge;
#[path = "common/peers.rs"]
#[allow(dead_code)]
mod peers;

#[derive(Parser)]
struct Args {
    /// Mesh sizes to measure, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "10,30,100")]
    peers: Vec<usize>,
    /// Taskunits of the job per peer.
    #[arg(long, default_value_t = 20)]
    units_per_peer: u64,
    /// The antnest binary (default: beside this example's directory).
    #[arg(long)]
    antnest: Option<PathBuf>,
}

struct Peer {
    child: Child,
    control: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn primes_module() -> Result<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = repo.join("target/jobs");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "primes",
        ])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(repo)
        .status()?;
    if !status.success() {
        bail!("building jobs/primes failed");
    }
    Ok(target.join("wasm32-wasip2/release/primes.wasm"))
}

fn input(units: u64) -> Vec<u8> {
    (0..units)
        .flat_map(|i| format!("{}\n", 200_000 + i).into_bytes())
        .collect()
}

/// Run `antnest submit` on `control` (or standalone with one slot); its
/// wall time and stats.
fn submit(
    bin: &Path,
    control: Option<&Path>,
    module: &Path,
    units: u64,
    stats: &Path,
) -> Result<(Duration, serde_json::Value)> {
    let mut cmd = Command::new(bin);
    cmd.arg("submit")
        .arg(module)
        .args(["-q", "--stats-json"])
        .arg(stats);
    match control {
        Some(c) => cmd.arg("--control").arg(c),
        None => cmd.args([
            "--standalone",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--slots",
            "1",
        ]),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let started = Instant::now();
    let data = input(units);
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let status = child.wait()?;
    let took = started.elapsed();
    if !status.success() {
        bail!("submit failed: {status}");
    }
    Ok((took, serde_json::from_slice(&std::fs::read(stats)?)?))
}

fn ask(control: &Path, request: ControlRequest) -> Result<ControlReply> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut s = antnest::client::connect(control).await?;
        control::write_msg(&mut s, &request).await?;
        control::read_msg::<ControlReply, _>(&mut s)
            .await?
            .context("no answer")
    })
}

fn proc_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User and system CPU time of `pid`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis (the state first);
    // utime and stime are the 14th and 15th of the line (in clock ticks,
    // 100 a second).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

fn per_peer_rate(before: &[u64], after: &[u64], over: Duration) -> f64 {
    let total: u64 = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    total as f64 / after.len().max(1) as f64 / over.as_secs_f64()
}

fn measure(
    bin: &Path,
    module: &Path,
    n: usize,
    units_per_peer: u64,
    unit_time: Duration,
) -> Result<()> {
    let Some(net) = bridge::Bridge::create(n) else {
        bail!("network namespaces cannot be made here (needs root)");
    };
    let net = net.map_err(anyhow::Error::msg)?;
    let dir = tempfile::Builder::new().prefix("scale").tempdir()?;
    let started = Instant::now();
    let mut peers = Vec::new();
    let mut ready = Vec::new();
    for i in 0..n {
        let control = dir.path().join(format!("p{i}.sock"));
        let mut child = net
            .cmd(i, bin)
            .args([
                "peer",
                "--listen",
                "/ip4/0.0.0.0/tcp/0",
                "--slots",
                "1",
                "--control",
            ])
            .arg(&control)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .env(
                "RUST_LOG",
                std::env::var("SCALE_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join(format!("p{i}.log")))?)
            .spawn()?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("control socket:") {
                    let _ = tx.send(());
                }
            }
        });
        ready.push(rx);
        peers.push(Peer { child, control });
    }
    for rx in &ready {
        rx.recv_timeout(Duration::from_secs(60))
            .context("a peer did not start")?;
    }
    let all_started = started.elapsed();
    // Until every peer has a connection.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut connections = vec![0usize; n];
    loop {
        for (i, p) in peers.iter().enumerate() {
            if connections[i] == 0
                && let Ok(ControlReply::Peers { peers, .. }) =
                    ask(&p.control, ControlRequest::Peers)
            {
                connections[i] = peers.iter().filter(|p| p.connected).count();
            }
        }
        if connections.iter().all(|c| *c > 0) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let meshed = started.elapsed();
    // A while for discovery to settle, then the idle traffic.
    std::thread::sleep(Duration::from_secs(5));
    let mut conns = Vec::new();
    for p in &peers {
        if let Ok(ControlReply::Peers { peers, .. }) = ask(&p.control, ControlRequest::Peers) {
            conns.push(peers.iter().filter(|p| p.connected).count());
        }
    }
    conns.sort_unstable();
    let window = Duration::from_secs(5);
    let before = net.bytes_to_hosts();
    std::thread::sleep(window);
    let idle_rate = per_peer_rate(&before, &net.bytes_to_hosts(), window);

    let master = &peers[n - 1];
    let pid = master.child.id();
    let master_id = match ask(&master.control, ControlRequest::Peers)? {
        ControlReply::Peers { local, .. } => local,
        other => bail!("unexpected answer {other:?}"),
    };
    let (rss0, cpu0) = (proc_field(pid, "VmRSS:"), cpu_time(pid));
    let units = units_per_peer * n as u64;
    let stats = dir.path().join("stats.json");
    let control = master.control.clone();
    let (bin2, module2, stats2) = (bin.to_owned(), module.to_owned(), stats.clone());
    let job = std::thread::spawn(move || submit(&bin2, Some(&control), &module2, units, &stats2));
    let submitted = Instant::now();
    let bytes0 = net.bytes_to_hosts();
    let mut reached_all = None;
    let mut rss_peak = rss0;
    while !job.is_finished() {
        rss_peak = rss_peak.max(proc_field(pid, "VmRSS:"));
        if reached_all.is_none()
            && let Ok(ControlReply::Jobs(jobs)) = ask(&master.control, ControlRequest::Jobs)
            && jobs.first().is_some_and(|j| j.workers.len() >= n - 1)
        {
            reached_all = Some(submitted.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let job_rate = per_peer_rate(&bytes0, &net.bytes_to_hosts(), submitted.elapsed());
    let (wall, s) = job.join().expect("submit thread")?;
    let cpu = cpu_time(pid).saturating_sub(cpu0);
    let per_peer = s["per_peer"].as_object().context("no per_peer")?;
    let worked = per_peer
        .values()
        .filter(|v| v.as_u64().unwrap_or(0) > 0)
        .count();
    let workers = (worked.max(2) - 1) as f64;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let ideal = unit_time.as_secs_f64() * units as f64 / cores.min(n) as f64;
    println!(
        "N={n:<4} started {:.1}s, every peer connected {:.1}s; connections per peer min/median/max {}/{}/{}",
        all_started.as_secs_f64(),
        meshed.as_secs_f64(),
        conns.first().unwrap_or(&0),
        conns.get(conns.len() / 2).unwrap_or(&0),
        conns.last().unwrap_or(&0),
    );
    println!(
        "       idle traffic {:.0} B/s per peer; during the job {:.0} B/s per peer",
        idle_rate, job_rate
    );
    println!(
        "       job of {units} taskunits: reached every peer {}, {worked}/{n} peers worked, wall {:.2}s vs ideal {:.2}s ({:.2}x)",
        reached_all.map_or("never (within the job)".to_string(), |t| format!(
            "{:.2}s after submit",
            t.as_secs_f64()
        )),
        wall.as_secs_f64(),
        ideal,
        wall.as_secs_f64() / ideal,
    );
    // What the master spent beyond running its own slot's taskunits.
    let own = per_peer
        .get(&master_id)
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let serving = cpu.as_secs_f64() - own as f64 * unit_time.as_secs_f64();
    println!(
        "       master: CPU {:.2}s, {:.2}s of it beyond its own {own} taskunits ({:.1} ms per worker), RSS {} -> {} KiB (+{:.0} KiB per worker)",
        cpu.as_secs_f64(),
        serving,
        serving.max(0.0) * 1e3 / workers,
        rss0,
        rss_peak,
        rss_peak.saturating_sub(rss0) as f64 / workers,
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = peers::antnest_bin(args.antnest.as_deref())?;
    let module = primes_module()?;
    // The single-thread time of one taskunit: a standalone one-slot peer
    // over two job sizes (the difference leaves out start and end).
    let dir = tempfile::tempdir()?;
    let (small, _) = submit(&bin, None, &module, 100, &dir.path().join("a.json"))?;
    let (large, _) = submit(&bin, None, &module, 400, &dir.path().join("b.json"))?;
    let unit_time = large.saturating_sub(small) / 300;
    println!(
        "one taskunit on one thread: {:.2} ms",
        unit_time.as_secs_f64() * 1e3
    );
    for n in args.peers {
        measure(&bin, &module, n, args.units_per_peer, unit_time)?;
    }
    Ok(())
}

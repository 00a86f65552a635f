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
    /// Instead: two peers of this host, connected directly and then across
    /// a slow link (50 ms round trip, 100 Mbit/s each way, made by a
    /// delaying proxy): a W2-style job's parallel efficiency and a
    /// W3-style job's throughput on each.
    #[arg(long)]
    link: bool,
    /// The W3-style job's input (default: 100 MB of generated words).
    #[arg(long)]
    words: Option<PathBuf>,
    /// More arguments for every `antnest peer`, e.g. "--no-quic".
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    peer_args: String,
    /// The antnest binary (default: beside this example's directory).
    #[arg(long)]
    antnest: Option<PathBuf>,
}

struct Peer {
    child: Child,
    control: PathBuf,
    /// Its web view's base URL, inside its namespace.
    ui: String,
}

/// Bytes of job announcements host `i` has received, duplicates included
/// (gossipsub's own count), and each once (antnest's count of what
/// gossipsub delivered), from the peer's /metrics; `None` if it could not
/// be read (a peer left out of the sums, rather than counted from zero).
fn announce_bytes(net: &bridge::Bridge, i: usize, ui: &str) -> Option<(u64, u64, u64)> {
    let out = net
        .cmd(i, Path::new("curl"))
        .args(["-sf", "--max-time", "10", &format!("{ui}metrics")])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = |prefix: &str| -> Option<u64> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    Some((
        sum("gossipsub_topic_msg_recv_bytes_unfiltered_total{")?,
        sum("antnest_announcement_bytes_received_total")?,
        sum("antnest_announcement_bytes_sent_total")?,
    ))
}

/// [`announce_bytes`] of every peer, read at once (read one after
/// another, 100 busy peers take longer than a job runs).
fn all_announce_bytes(net: &bridge::Bridge, peers: &[Peer]) -> Vec<Option<(u64, u64, u64)>> {
    std::thread::scope(|s| {
        let reads: Vec<_> = (peers.iter().enumerate())
            .map(|(i, p)| s.spawn(move || announce_bytes(net, i, &p.ui)))
            .collect();
        reads.into_iter().map(|r| r.join().ok().flatten()).collect()
    })
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn job_module(name: &str) -> Result<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = repo.join("target/jobs");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            name,
        ])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(repo)
        .status()?;
    if !status.success() {
        bail!("building jobs/{name} failed");
    }
    Ok(target.join(format!("wasm32-wasip2/release/{name}.wasm")))
}

fn primes_input(units: u64) -> Vec<u8> {
    (0..units)
        .flat_map(|i| format!("{}\n", 200_000 + i).into_bytes())
        .collect()
}

/// Run `antnest submit` on `control` (or standalone with one slot) with
/// `units` primes taskunits; its wall time and stats.
fn submit(
    bin: &Path,
    control: Option<&Path>,
    module: &Path,
    units: u64,
    stats: &Path,
) -> Result<(Duration, serde_json::Value)> {
    submit_input(
        bin,
        control,
        module,
        Input::Bytes(primes_input(units)),
        stats,
    )
}

enum Input {
    Bytes(Vec<u8>),
    File(PathBuf),
}

fn submit_input(
    bin: &Path,
    control: Option<&Path>,
    module: &Path,
    input: Input,
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
    if let Input::File(path) = &input {
        cmd.arg("--input").arg(path);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let started = Instant::now();
    let mut stdin = child.stdin.take().unwrap();
    if let Input::Bytes(data) = input {
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    }
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

/// 100 MB of words from a 5,000-word vocabulary, in 1 MB lines' worth of
/// chunks (as the harness's W3 input).
fn generate_words(path: &Path) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 20240607;
    let mut written = 0;
    while written < 100_000_000 {
        let mut line = String::new();
        while line.len() < 100 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            line.push_str(&format!("w{} ", x % 5000));
        }
        line.push('\n');
        written += line.len();
        out.write_all(line.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

/// A TCP proxy on loopback that delays what it carries by `one_way` in
/// each direction and paces it to `bits_per_s`: a slow link between two
/// peers of this host. (This kernel has no `tc netem`.) Its address, and
/// the bytes it has carried.
fn slow_proxy(
    target: std::net::SocketAddr,
    one_way: Duration,
    bits_per_s: f64,
) -> Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let carried = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = carried.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let link = (one_way, bits_per_s, counted.clone());
                tokio::spawn(slow_pipe(ri, wo, link.clone()));
                tokio::spawn(slow_pipe(ro, wi, link));
            }
        });
    });
    Ok((addr, carried))
}

/// One direction of [`slow_proxy`]: each chunk read leaves when the link
/// is free, takes its size over the rate to send, and arrives `one_way`
/// later; at most 16 MB are in flight (the link's queue).
async fn slow_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    (one_way, bits_per_s, carried): (Duration, f64, std::sync::Arc<std::sync::atomic::AtomicU64>),
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        let mut free_at = Instant::now();
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let sending = Duration::from_secs_f64(n as f64 * 8.0 / bits_per_s);
            free_at = free_at.max(Instant::now()) + sending;
            if tx
                .send((free_at + one_way, buf[..n].to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
            carried.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// A W2-style job's parallel efficiency and a W3-style job's throughput on
/// two one-slot peers of this host, connected directly and then through
/// [`slow_proxy`] at 50 ms round trip and 100 Mbit/s.
fn slow_link(bin: &Path, primes: &Path, unit_time: Duration, words: Option<PathBuf>) -> Result<()> {
    let wordcount = job_module("wordcount")?;
    let dir = tempfile::Builder::new().prefix("link").tempdir()?;
    let words = match words {
        Some(w) => w,
        None => {
            let w = dir.path().join("words.txt");
            generate_words(&w)?;
            w
        }
    };
    let size = std::fs::metadata(&words)?.len() as f64;
    let units = 400;
    let ideal = unit_time.as_secs_f64() * units as f64 / 2.0;
    let mut figures = Vec::new();
    for slow in [false, true] {
        let run_dir = tempfile::tempdir()?;
        let master = peers::start_peer(bin, run_dir.path(), 0, 1, None, &[], None)?;
        let carried;
        let bootstrap = if slow {
            // The worker reaches the master only through the proxy.
            let (ip_port, id) = master
                .addr
                .strip_prefix("/ip4/")
                .and_then(|a| a.split_once("/p2p/"))
                .context("master address")?;
            let target: std::net::SocketAddr = ip_port.replacen("/tcp/", ":", 1).parse()?;
            let (proxy, count) = slow_proxy(target, Duration::from_millis(25), 100e6)?;
            carried = Some(count);
            format!("/ip4/127.0.0.1/tcp/{}/p2p/{id}", proxy.port())
        } else {
            carried = None;
            master.addr.clone()
        };
        let _worker = peers::start_peer(bin, run_dir.path(), 1, 1, Some(&bootstrap), &[], None)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(ask(&master.control, ControlRequest::Peers)?,
            ControlReply::Peers { peers, .. } if peers.iter().any(|p| p.connected))
        {
            if Instant::now() > deadline {
                bail!("the worker did not connect");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let stats = run_dir.path().join("s.json");
        let (w2, s2) = submit(bin, Some(&master.control), primes, units, &stats)?;
        let (w3, s3) = submit_input(
            bin,
            Some(&master.control),
            &wordcount,
            Input::File(words.clone()),
            &stats,
        )?;
        let label = if slow {
            "50 ms RTT, 100 Mbit/s"
        } else {
            "direct (loopback)"
        };
        println!(
            "{label:<22} W2-style: {:.2}s, efficiency {:.3} (taskunits per peer {}); W3-style: {:.2}s, {:.1} MB/s (per peer {})",
            w2.as_secs_f64(),
            ideal / w2.as_secs_f64(),
            s2["per_peer"],
            w3.as_secs_f64(),
            size / 1e6 / w3.as_secs_f64(),
            s3["per_peer"],
        );
        if let Some(c) = carried {
            println!(
                "{:<22} the proxy carried {:.1} MB",
                "",
                c.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
            );
        }
        figures.push((ideal / w2.as_secs_f64(), size / 1e6 / w3.as_secs_f64()));
    }
    println!(
        "slow link against direct: W2-style efficiency {:.2}x, W3-style throughput {:.2}x",
        figures[1].0 / figures[0].0,
        figures[1].1 / figures[0].1
    );
    Ok(())
}

fn measure(
    bin: &Path,
    module: &Path,
    n: usize,
    units_per_peer: u64,
    unit_time: Duration,
    peer_args: &[&str],
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
                "--ui",
                "127.0.0.1:0",
            ])
            .args(peer_args)
            .arg("--control")
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
            let mut ui = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("ui: ") {
                    ui = url.to_string();
                }
                if line.starts_with("control socket:") {
                    let _ = tx.send(std::mem::take(&mut ui));
                }
            }
        });
        ready.push(rx);
        peers.push(Peer {
            child,
            control,
            ui: String::new(),
        });
    }
    for (peer, rx) in peers.iter_mut().zip(&ready) {
        peer.ui = rx
            .recv_timeout(Duration::from_secs(60))
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
    let announced0 = all_announce_bytes(&net, &peers);
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
    let job_time = submitted.elapsed();
    // Per peer read both times: what it received during the job.
    let announced = all_announce_bytes(&net, &peers);
    let deltas: Vec<(u64, u64, u64)> = (0..n)
        .filter_map(|i| {
            let ((a0, b0, c0), (a, b, c)) = (announced0[i]?, announced[i]?);
            Some((
                a.saturating_sub(a0),
                b.saturating_sub(b0),
                c.saturating_sub(c0),
            ))
        })
        .collect();
    let published = deltas.iter().map(|d| d.2).sum::<u64>() as f64 / job_time.as_secs_f64();
    let read = deltas.len().max(1) as f64 * job_time.as_secs_f64();
    let announce_rate = deltas.iter().map(|d| d.0).sum::<u64>() as f64 / read;
    let announce_once = deltas.iter().map(|d| d.1).sum::<u64>() as f64 / read;
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
        "       idle traffic {:.0} B/s per peer; during the job {:.0} B/s per peer, of which announcements {:.0} B/s with duplicates, {:.0} B/s each once ({} peers read; {:.0} B/s published by all)",
        idle_rate,
        job_rate,
        announce_rate,
        announce_once,
        deltas.len(),
        published
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
    let module = job_module("primes")?;
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
    if args.link {
        return slow_link(&bin, &module, unit_time, args.words);
    }
    for n in args.peers {
        let peer_args: Vec<&str> = args.peer_args.split_whitespace().collect();
        measure(&bin, &module, n, args.units_per_peer, unit_time, &peer_args)?;
    }
    Ok(())
}

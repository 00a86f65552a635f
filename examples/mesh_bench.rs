//! Runs the peer harness's three workloads (`../shared/bench/peers`) as
//! antnest jobs through a real mesh of peer processes on loopback, and
//! speaks the harness's `--ext` protocol:
//!
//! ```sh
//! cargo build --release --example mesh_bench
//! target/release/examples/mesh_bench --inputs /tmp/peers-cache/inputs-<hash> \
//!     --workloads W1,W2,W3 --result out.json --timeout 300
//! # side by side with the Python systems, in one run:
//! cd ../shared/bench/peers && python run_peers.py --systems seq,mp,dask,ray,celery \
//!     --ext mesh="$PWD/../../../main/target/release/examples/mesh_bench --nodes 2"
//! ```
//!
//! W1 runs `jobs/reverse_strings`, W2 `jobs/primes`, W3 `jobs/wordcount`
//! (Rust jobs). With `--python wasm` or `--python native` they are the
//! Python jobs of `jobs/harness/` instead, written as a Python user writes
//! them, run in antnest's CPython component or in each worker's own
//! CPython under bubblewrap (the peers then share a mesh key and allow
//! native Python).
//! Besides the result file it prints extra figures to stderr: a native
//! two-thread Rust word count over the same W3 input, the idle peer's RSS,
//! time to first result, module cache hits, and with `--million` the
//! master's peak RSS over a 1,000,000-taskunit job, and with
//! `--efficiency ROUNDS` W2's parallel efficiency next to the machine's own
//! ceiling (the same wasm on 1 and on `nodes` threads, no mesh).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use sha2::{Digest, Sha256};

#[path = "../jobs/wordcount/src/count.rs"]
pub mod count;
#[path = "common/peers.rs"]
mod peers;

use antnest_proto::control::{self, ControlReply, ControlRequest, InputSpec, JobReport, JobSpec};
use antnest_proto::{ByteBuf, Limits, ModuleHash, Runtime};
use antnest_sandbox::{Sandbox, TaskRunner};
use peers::start_peer;

#[derive(Parser)]
struct Args {
    /// Directory with w1.txt, w2.txt, w3.txt.
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long, default_value = "W1,W2,W3")]
    workloads: String,
    /// Where to write the result JSON.
    #[arg(long)]
    result: PathBuf,
    /// Seconds allowed per workload.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Peer processes in the mesh.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Worker slots per peer.
    #[arg(long, default_value_t = 1)]
    slots: usize,
    /// Also run a 1,000,000-taskunit job and report the master's peak RSS.
    #[arg(long)]
    million: bool,
    /// Also measure W2's parallel efficiency over this many alternating
    /// rounds: a lone peer against the mesh, and, as the machine's own
    /// ceiling, the same wasm taskunits on one thread against `nodes`
    /// threads in this process (no mesh at all).
    #[arg(long, default_value_t = 0)]
    efficiency: usize,
    /// Write each efficiency round's four times (seconds: lone peer, mesh,
    /// 1 thread, `nodes` threads) to FILE as CSV, to see the host drift.
    #[arg(long)]
    rounds_csv: Option<PathBuf>,
    /// Write each peer's stderr (its log: set RUST_LOG) to DIR/peerN.log.
    #[arg(long)]
    peer_logs: Option<PathBuf>,
    /// The antnest binary (default: beside this example's directory).
    #[arg(long)]
    antnest: Option<PathBuf>,
    /// Spot-check this share of remote results (`antnest submit
    /// --verify`); default: the master's (0.02 on this open mesh).
    #[arg(long, value_name = "RATE")]
    verify: Option<f64>,
    /// Run the Python jobs of jobs/harness/ in this runtime (wasm or
    /// native) instead of the Rust jobs.
    #[arg(long, value_name = "RUNTIME")]
    python: Option<Runtime>,
}

/// `--verify`, for every job submitted.
static VERIFY: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Build the sample jobs (release, wasm32-wasip2) into target/jobs.
fn job_modules() -> Result<HashMap<&'static str, Vec<u8>>> {
    let target = repo().join("target/jobs");
    let status = Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .args(["-p", "reverse_strings", "-p", "primes", "-p", "wordcount"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("building the jobs failed (run tests/setup.sh first)");
    }
    let mut m = HashMap::new();
    for (w, name) in [
        ("W1", "reverse_strings"),
        ("W2", "primes"),
        ("W3", "wordcount"),
    ] {
        let p = target.join(format!("wasm32-wasip2/release/{name}.wasm"));
        m.insert(
            w,
            std::fs::read(&p).with_context(|| p.display().to_string())?,
        );
    }
    Ok(m)
}

/// The Python jobs of jobs/harness/, built as `antnest submit` builds them
/// (antnest's Python runner, built once into `cache`, with the job's file).
fn python_modules(cache: &Path) -> Result<HashMap<&'static str, Vec<u8>>> {
    let mut m = HashMap::new();
    for (w, name) in [
        ("W1", "w1_reverse"),
        ("W2", "w2_primes"),
        ("W3", "w3_wordcount"),
    ] {
        let p = repo().join(format!("jobs/harness/{name}.py"));
        let module = antnest::source::load(&p, Some(cache), &[])
            .with_context(|| format!("building {}", p.display()))?;
        m.insert(w, module);
    }
    Ok(m)
}

/// Submit a job as `antnest submit` does: the module's hash first, and its
/// bytes only if the peer asks for them.
async fn submit(
    control: &Path,
    module: &[u8],
    runtime: Runtime,
    input: InputSpec,
    timeout: Duration,
) -> Result<JobReport> {
    let mut spec = JobSpec {
        module: ByteBuf::new(),
        module_hash: Some(ModuleHash::of(module)),
        input,
        limits: None,
        max_attempts: 3,
        keep_going: false,
        resume: None,
        replicate: 1,
        verify: VERIFY.get().copied().flatten(),
        weight: 1,
        stream: false,
        runtime,
    };
    let run = async {
        loop {
            let mut s = antnest::client::connect(control).await?;
            let request = ControlRequest::Submit(Box::new(spec.clone()));
            control::write_msg(&mut s, &request).await?;
            loop {
                match control::read_msg::<ControlReply, _>(&mut s).await? {
                    Some(ControlReply::Event(_)) => continue,
                    Some(ControlReply::Done(r)) => return Ok(*r),
                    Some(ControlReply::NeedModule) if spec.module.is_empty() => {
                        spec.module = ByteBuf::from(module.to_vec());
                        break;
                    }
                    Some(ControlReply::Failed { error, .. }) => bail!("job failed: {error}"),
                    other => bail!("unexpected reply {other:?}"),
                }
            }
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .context("workload timed out")?
}

fn digest(workload: &str, output: &[u8]) -> String {
    match workload {
        // Results are joined by newlines; the harness hashes their concatenation.
        "W1" => {
            let joined: Vec<u8> = output.iter().copied().filter(|&b| b != b'\n').collect();
            hex::encode(Sha256::digest(joined))
        }
        "W2" => String::from_utf8_lossy(output).trim().to_string(),
        _ => hex::encode(Sha256::digest(output)),
    }
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// SHA-256 of `word\tcount\n` lines sorted by word, as the job writes them.
fn counts_digest<W: AsRef<[u8]> + Ord>(counts: HashMap<W, u64>) -> String {
    let mut words: Vec<_> = counts.into_iter().collect();
    words.sort_unstable();
    let mut h = Sha256::new();
    for (w, c) in words {
        h.update(w);
        h.update(format!("\t{c}\n"));
    }
    hex::encode(h.finalize())
}

/// The non-empty lines of `data` (W2's taskunits under the default split).
fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

/// Runs `count` on two threads, each over half of the non-empty lines of
/// `data`, and returns what each thread counted.
fn on_two_threads<'d, T: Send>(data: &'d [u8], count: impl Fn(&[&'d [u8]]) -> T + Sync) -> Vec<T> {
    let lines: Vec<&[u8]> = lines(data).collect();
    let half = lines.len().div_ceil(2).max(1);
    let count = &count;
    std::thread::scope(|s| {
        let handles: Vec<_> = lines
            .chunks(half)
            .map(|part| s.spawn(move || count(part)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Native two-thread word count over the W3 lines (read from disk, as the mesh does).
fn native_wordcount(path: &Path) -> Result<(Duration, String)> {
    let t = Instant::now();
    let data = std::fs::read(path)?;
    let counts = on_two_threads(&data, |part| {
        let mut m: HashMap<&[u8], u64> = HashMap::new();
        for line in part {
            for w in line
                .split(|b| b.is_ascii_whitespace())
                .filter(|w| !w.is_empty())
            {
                *m.entry(w).or_default() += 1;
            }
        }
        m
    });
    let mut total: HashMap<&[u8], u64> = HashMap::new();
    for m in counts {
        for (w, c) in m {
            *total.entry(w).or_default() += c;
        }
    }
    Ok((t.elapsed(), counts_digest(total)))
}

/// The job's own counting code (`jobs/wordcount/src/count.rs`, SSE2 here
/// instead of wasm SIMD), natively on two threads over the same lines.
fn native_same_algorithm(path: &Path) -> Result<(Duration, String)> {
    let t = Instant::now();
    let data = std::fs::read(path)?;
    let counters = on_two_threads(&data, |part| {
        let mut c = count::Counter::new();
        for line in part {
            c.count(line);
        }
        c
    });
    let mut total: HashMap<Vec<u8>, u64> = HashMap::new();
    for c in &counters {
        c.each(|w, n| *total.entry(w.to_vec()).or_default() += n);
    }
    Ok((t.elapsed(), counts_digest(total)))
}

/// Runs `units` in this process, without a mesh, on one thread per runner
/// (each runner a warm instance with an equal share); returns the wall time
/// in seconds.
fn in_process(runners: &mut [TaskRunner], units: &[Vec<u8>]) -> Result<f64> {
    let share = units.len().div_ceil(runners.len()).max(1);
    let t = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = runners
            .iter_mut()
            .zip(units.chunks(share))
            .map(|(r, part)| s.spawn(move || part.iter().try_for_each(|u| r.process(u).map(drop))))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("runner thread"))
    })?;
    Ok(t.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// W2's parallel efficiency, T(1)/(n·T(n)), for the mesh and for the
/// machine itself, from `rounds` rounds that alternate all four runs so
/// that the host's drift hits each alike.
async fn efficiency(
    args: &Args,
    lone: &Path,
    master: &Path,
    module: &[u8],
    input: &Path,
    timeout: Duration,
) -> Result<()> {
    let (rounds, n) = (args.efficiency, args.nodes * args.slots);
    let env = Sandbox::new(None)?;
    let component = env.component(&ModuleHash::of(module), || Some(module.to_vec()))?;
    let units: Vec<Vec<u8>> = lines(&std::fs::read(input)?).map(<[u8]>::to_vec).collect();
    let mut runners: Vec<TaskRunner> = (0..n)
        .map(|_| TaskRunner::new(env.clone(), component.clone(), Limits::default()))
        .collect();
    for r in &mut runners {
        r.process(&units[0])?; // instantiate before timing
    }
    let [mut mesh1, mut meshn, mut native1, mut nativen] = [(); 4].map(|_| Vec::new());
    let mut outputs = std::collections::HashSet::new();
    for _ in 0..rounds {
        for (control, times) in [(lone, &mut mesh1), (master, &mut meshn)] {
            let t = Instant::now();
            let report = submit(
                control,
                module,
                Runtime::Wasm,
                InputSpec::Path(input.to_path_buf()),
                timeout,
            )
            .await?;
            times.push(t.elapsed().as_secs_f64());
            outputs.insert(report.output);
        }
        native1.push(in_process(&mut runners[..1], &units)?);
        nativen.push(in_process(&mut runners, &units)?);
    }
    if outputs.len() != 1 {
        bail!("the lone peer and the mesh disagree on W2's result");
    }
    if let Some(path) = &args.rounds_csv {
        let mut csv = String::from("round,lone_s,mesh_s,native1_s,native_n_s\n");
        for i in 0..rounds {
            csv += &format!(
                "{i},{:.6},{:.6},{:.6},{:.6}\n",
                mesh1[i], meshn[i], native1[i], nativen[i]
            );
        }
        std::fs::write(path, csv).with_context(|| path.display().to_string())?;
    }
    let eff = |one: f64, many: f64| one / (n as f64 * many);
    // Each round's mesh efficiency against the machine's in the same round.
    let of_ceiling: Vec<f64> = (0..rounds)
        .map(|i| eff(mesh1[i], meshn[i]) / eff(native1[i], nativen[i]))
        .collect();
    // How T(n) spread over the rounds: a slow stretch of the host shows as
    // a high quartile, not only as a high median.
    let spread = {
        let mut v = meshn.clone();
        v.sort_by(f64::total_cmp);
        let at = |q: usize| v[(v.len() - 1) * q / 4] * 1e3;
        format!(
            "{:.1} / {:.1} / {:.1} / {:.1} / {:.1}",
            at(0),
            at(1),
            at(2),
            at(3),
            at(4)
        )
    };
    let [mesh1, meshn, native1, nativen] = [mesh1, meshn, native1, nativen].map(median);
    eprintln!(
        "W2 efficiency T(1)/({n}*T({n})), {rounds} alternating rounds, medians: \
         lone peer {mesh1:.4} s, {n}-peer mesh {meshn:.4} s -> {:.3}; \
         no mesh, 1 thread {native1:.4} s, {n} threads {nativen:.4} s -> machine ceiling {:.3}; \
         mesh/ceiling per round: median {:.3}; {n}-peer mesh per round, \
         min / 25% / median / 75% / max: {spread} ms",
        eff(mesh1, meshn),
        eff(native1, nativen),
        median(of_ceiling),
    );
    Ok(())
}

/// A small input of the same shape, for the warm-up round trip.
fn warmup_input(workload: &str, dir: &Path) -> Result<Vec<u8>> {
    let file = dir.join(format!("{}.txt", workload.to_lowercase()));
    let reader =
        BufReader::new(std::fs::File::open(&file).with_context(|| file.display().to_string())?);
    let mut out = Vec::new();
    let lines = match workload {
        "W1" => 2000,
        "W2" => 8,
        _ => 4,
    };
    for line in reader.split(b'\n').take(lines) {
        let mut line = line?;
        if workload == "W3" {
            line.truncate(200_000);
            while line.last().is_some_and(|b| !b.is_ascii_whitespace()) {
                line.pop();
            }
        }
        out.extend_from_slice(&line);
        out.push(b'\n');
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    VERIFY.set(args.verify).expect("set once");
    let timeout = Duration::from_secs_f64(args.timeout);
    let workloads: Vec<String> = args
        .workloads
        .split(',')
        .map(|s| s.trim().to_uppercase())
        .collect();
    let bin = peers::antnest_bin(args.antnest.as_deref())?;
    let dir = tempfile::tempdir()?;
    let runtime = args.python.unwrap_or(Runtime::Wasm);
    let (modules, extra) = match args.python {
        None => (job_modules()?, Vec::new()),
        Some(_) if args.efficiency > 0 || args.million => {
            bail!("--efficiency and --million measure the Rust jobs; leave out --python")
        }
        Some(Runtime::Auto) => bail!("--python takes wasm or native"),
        Some(Runtime::Wasm) => (
            python_modules(&repo().join("target/bench-cache"))?,
            Vec::new(),
        ),
        Some(Runtime::Native) => {
            // Workers run other masters' Python natively only in a mesh
            // whose peers share a key.
            let key = dir.path().join("mesh.key");
            let mut secret = [0u8; 32];
            std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut secret)?;
            let psk = hex::encode(secret);
            std::fs::write(&key, format!("/key/swarm/psk/1.0.0/\n/base16/\n{psk}\n"))?;
            let extra = ["--allow-native-python", "--mesh-key"].map(String::from);
            let mut extra = extra.to_vec();
            extra.push(key.display().to_string());
            (python_modules(&repo().join("target/bench-cache"))?, extra)
        }
    };

    let logs = args.peer_logs.as_deref();
    let t0 = Instant::now();
    let mut peers = vec![start_peer(
        &bin,
        dir.path(),
        0,
        args.slots,
        None,
        &extra,
        logs,
    )?];
    let first = peers[0].addr.clone();
    for i in 1..args.nodes {
        peers.push(start_peer(
            &bin,
            dir.path(),
            i,
            args.slots,
            Some(&first),
            &extra,
            logs,
        )?);
    }
    let master = peers[0].control.clone();
    let fresh_rss = rss_kib(peers[peers.len() - 1].child.id(), "VmRSS:");
    // Warm-up, so that every peer has fetched and compiled every module, as
    // the harness ships every task function to every worker. A small job of
    // one taskunit (W3's is one) is done by the master's own slot and may
    // never reach another peer, so each other peer first runs it as its own
    // master; then the master repeats it until every peer has worked on it
    // through the mesh, or 10 rounds.
    let mut first_result_ms = Vec::new();
    for w in &workloads {
        let input = warmup_input(w, &args.inputs)?;
        for p in &peers[1..] {
            submit(
                &p.control,
                &modules[w.as_str()],
                runtime,
                InputSpec::Bytes(ByteBuf::from(input.clone())),
                timeout,
            )
            .await?;
        }
        let mut rounds = 0;
        loop {
            let r = submit(
                &master,
                &modules[w.as_str()],
                runtime,
                InputSpec::Bytes(ByteBuf::from(input.clone())),
                timeout,
            )
            .await?;
            rounds += 1;
            if let Some(ms) = r.stats.first_result_ms {
                first_result_ms.push(ms);
            }
            if r.stats.per_peer.len() >= args.nodes || rounds >= 10 {
                eprintln!(
                    "{w} warm-up: {rounds} round(s), {} of {} peers worked",
                    r.stats.per_peer.len(),
                    args.nodes
                );
                break;
            }
        }
    }
    let startup_s = t0.elapsed().as_secs_f64();

    let mut results = serde_json::Map::new();
    let mut compiled = 0;
    let mut warm_first = Vec::new();
    for w in &workloads {
        let path = args.inputs.join(format!("{}.txt", w.to_lowercase()));
        let t = Instant::now();
        let report = submit(
            &master,
            &modules[w.as_str()],
            runtime,
            InputSpec::Path(path),
            timeout,
        )
        .await?;
        // As the harness does: the digest is computed after the timer stops.
        let wall = t.elapsed().as_secs_f64();
        let d = digest(w, &report.output);
        compiled += report.stats.compiled;
        warm_first.extend(report.stats.first_result_ms);
        eprintln!(
            "{w}: {:.4} s, {} tasks, per peer {:?}",
            wall, report.stats.tasks, report.stats.per_peer
        );
        results.insert(
            w.clone(),
            serde_json::json!({"wall_s": wall, "digest": d, "tasks": report.stats.tasks}),
        );
    }

    if let Some(p) = workloads
        .iter()
        .any(|w| w == "W3")
        .then(|| args.inputs.join("w3.txt"))
    {
        let size = std::fs::metadata(&p)?.len() as f64 / 1e6;
        for (what, run) in [
            (
                "native 2-thread Rust word count (std HashMap)",
                native_wordcount as fn(&Path) -> Result<(Duration, String)>,
            ),
            (
                "native 2-thread Rust word count (the job's own algorithm)",
                native_same_algorithm,
            ),
        ] {
            let (native, native_digest) = run(&p)?;
            eprintln!(
                "{what}: {:.4} s, {:.0} MB/s (digest {})",
                native.as_secs_f64(),
                size / native.as_secs_f64(),
                if results["W3"]["digest"] == native_digest {
                    "matches"
                } else {
                    "DIFFERS"
                }
            );
        }
    }
    if args.efficiency > 0 {
        // A one-slot peer of its own, outside the mesh, gives T(1).
        let lone = start_peer(&bin, dir.path(), args.nodes, 1, None, &[], logs)?;
        let w2 = args.inputs.join("w2.txt");
        let input = warmup_input("W2", &args.inputs)?;
        submit(
            &lone.control,
            &modules["W2"],
            Runtime::Wasm,
            InputSpec::Bytes(ByteBuf::from(input)),
            timeout,
        )
        .await?;
        efficiency(&args, &lone.control, &master, &modules["W2"], &w2, timeout).await?;
    }
    // Worker slots drop their instances after 5 s without work.
    std::thread::sleep(Duration::from_secs(6));
    eprintln!(
        "idle worker peer RSS: {} KiB fresh, {} KiB after the jobs",
        fresh_rss.unwrap_or(0),
        rss_kib(peers[peers.len() - 1].child.id(), "VmRSS:").unwrap_or(0)
    );
    eprintln!("submit to first result (warm mesh, ms): {warm_first:.2?}");
    eprintln!("components compiled by the master during the timed runs: {compiled}");
    if args.million {
        let input = dir.path().join("million.txt");
        let lines: String = (0..1_000_000)
            .map(|i| format!("taskunit-{i:07}\n"))
            .collect();
        std::fs::write(&input, lines)?;
        let t = Instant::now();
        let r = submit(
            &master,
            &modules["W1"],
            Runtime::Wasm,
            InputSpec::Path(input),
            timeout * 4,
        )
        .await?;
        eprintln!(
            "1,000,000 taskunits: {:.2} s, {} tasks, master peak RSS {} KiB",
            t.elapsed().as_secs_f64(),
            r.stats.tasks,
            rss_kib(peers[0].child.id(), "VmHWM:").unwrap_or(0)
        );
    }

    let t = Instant::now();
    for p in &peers {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(p.child.id().to_string())
            .status();
    }
    for p in &mut peers {
        let _ = p.child.wait();
    }
    let shutdown_s = t.elapsed().as_secs_f64();
    let out = serde_json::json!({
        "system": "antnest",
        "version": env!("CARGO_PKG_VERSION"),
        "workers": args.nodes * args.slots,
        "startup_s": startup_s,
        "shutdown_s": shutdown_s,
        "workloads": results,
    });
    std::fs::write(&args.result, serde_json::to_vec_pretty(&out)?)?;
    Ok(())
}

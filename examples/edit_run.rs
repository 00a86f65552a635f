//! The edit-run loop of a Python job (issue #25, part 3): on a warm
//! two-peer loopback mesh, change one line of a 64-taskunit W2-style job
//! (pure-Python prime counting, as the peer harness's W2) and submit it
//! again with `antnest submit`, as a user would. Prints, per round, the
//! time from running the command to its first result on stdout
//! (`--stream`), to the end, and how many taskunits each peer did.
//!
//! ```sh
//! cargo build --release --example edit_run && target/release/examples/edit_run
//! ```

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[path = "common/peers.rs"]
mod peers;

#[derive(Parser)]
struct Args {
    /// Edits to time (after a warm-up that builds and compiles the runner).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Taskunits per job.
    #[arg(long, default_value_t = 64)]
    units: usize,
    /// Each taskunit counts the primes below about this (the harness's W2: ~52,000).
    #[arg(long, default_value_t = 52_000)]
    n: u64,
    /// The antnest binary (default: beside this example's directory).
    #[arg(long)]
    antnest: Option<PathBuf>,
    /// Write each peer's stderr (its log: set RUST_LOG) to DIR/peerN.log.
    #[arg(long)]
    peer_logs: Option<PathBuf>,
}

/// The job: the harness's W2 in Python (`jobs/harness/w2_primes.py`) with
/// one line (`EDIT`) that each round changes.
fn job_source(edit: usize) -> String {
    format!(
        "EDIT = {edit}\n{}",
        include_str!("../jobs/harness/w2_primes.py")
    )
}

struct Round {
    first: Duration,
    all: Duration,
    per_peer: Vec<u64>,
}

/// `antnest submit` as a user types it, timed from the command's start.
fn submit(bin: &Path, dir: &Path, control: &Path, job: &Path, input: &Path) -> Result<Round> {
    let stats = dir.join("stats.json");
    let started = Instant::now();
    let mut child = Command::new(bin)
        .arg("submit")
        .arg(job)
        .arg("--input")
        .arg(input)
        .arg("--stream")
        .arg("--quiet")
        .arg("--stats-json")
        .arg(&stats)
        .arg("--control")
        .arg(control)
        .arg("--cache-dir")
        .arg(dir.join("submitter-cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut first = None;
    let mut lines = 0;
    // Results as they come (raw: a Python value streams pickled).
    for line in BufReader::new(child.stdout.take().unwrap()).split(b'\n') {
        line?;
        first.get_or_insert_with(|| started.elapsed());
        lines += 1;
    }
    let status = child.wait()?;
    let all = started.elapsed();
    if !status.success() {
        bail!("antnest submit failed: {status}");
    }
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats)?)?;
    let per_peer = stats["per_peer"]
        .as_object()
        .context("no per_peer in the stats")?
        .values()
        .filter_map(|v| v.as_u64())
        .collect();
    if lines == 0 {
        bail!("no results");
    }
    Ok(Round {
        first: first.unwrap_or(all),
        all,
        per_peer,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = peers::antnest_bin(args.antnest.as_deref())?;
    let dir = tempfile::tempdir()?;
    let logs = args.peer_logs.as_deref();
    let a = peers::start_peer(&bin, dir.path(), 0, 1, None, &[], logs)?;
    let b = peers::start_peer(&bin, dir.path(), 1, 1, Some(&a.addr), &[], logs)?;
    let job = dir.path().join("primes_job.py");
    let input = dir.path().join("in.txt");
    // Slightly different n per taskunit, as the harness's W2 does.
    let units: String = (0..args.units)
        .map(|i| format!("{}\n", args.n + i as u64))
        .collect();
    std::fs::write(&input, units)?;

    // Warm-up: the submitter builds the runner (once per machine), each
    // peer compiles it, as master of a job of its own and as a worker.
    for (round, control) in [&a.control, &b.control, &a.control].iter().enumerate() {
        std::fs::write(&job, job_source(round))?;
        let r = submit(&bin, dir.path(), control, &job, &input)?;
        eprintln!(
            "warm-up {round}: {:.2} s, per peer {:?}",
            r.all.as_secs_f64(),
            r.per_peer
        );
    }
    println!(
        "edit-run loop: {} taskunits, n ≈ {}, two peers of one slot",
        args.units, args.n
    );
    let mut firsts = Vec::new();
    for round in 0..args.rounds {
        std::fs::write(&job, job_source(100 + round))?;
        let r = submit(&bin, dir.path(), &a.control, &job, &input)?;
        println!(
            "edit {round}: first result {:.2} s, all {:.2} s, taskunits per peer {:?}",
            r.first.as_secs_f64(),
            r.all.as_secs_f64(),
            r.per_peer
        );
        firsts.push(r.first.as_secs_f64());
    }
    firsts.sort_by(f64::total_cmp);
    if let Some(m) = firsts.get(firsts.len() / 2) {
        println!("median first result after an edit: {m:.2} s (target: under 3 s)");
    }
    Ok(())
}

//! Fair sharing between masters: a worker's slots, the masters' own
//! included, go to the jobs they know in equal parts (or by `--weight`).

use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(300);

/// Four one-slot peers on loopback, all connected to each other.
fn four_peers(dir: &std::path::Path) -> Vec<PeerProc> {
    let a = PeerProc::loopback(dir, "a", &[]);
    let mut peers = vec![];
    for name in ["b", "c", "d"] {
        peers.push(PeerProc::loopback(dir, name, &["--bootstrap", a.addr()]));
    }
    peers.insert(0, a);
    for p in &peers {
        eventually(Duration::from_secs(30), "the four peers connected", || {
            let out = run(&["peers", "--control", p.control.to_str().unwrap()], b"", T);
            text(&out.stdout).matches(" connected").count() >= 3
        });
    }
    peers
}

/// The taskunits each peer ran for a job, from its `--stats-json` file.
fn per_peer(stats: &std::path::Path, peers: &[PeerProc]) -> Vec<u64> {
    let s = stats_of(stats);
    peers
        .iter()
        .map(|p| {
            s["per_peer"]
                .get(&p.peer_id)
                .and_then(|n| n.as_u64())
                .unwrap_or(0)
        })
        .collect()
}

#[test]
fn fair_two_equal_jobs_from_two_peers_end_within_15_percent_of_each_other() {
    alone(|| {
        let dir = scratch();
        let peers = four_peers(dir.path());
        // Two jobs of the same work, different inputs: a few seconds each
        // when the mesh shares itself between them.
        let jobs = [primes_input(400, 300_000), primes_input(400, 300_400)];
        let stats: Vec<_> = (0..2)
            .map(|i| dir.path().join(format!("job{i}.json")))
            .collect();
        let start = Instant::now();
        let mut runs: Vec<Background> = (0..2)
            .map(|i| {
                let args = ["--stats-json", stats[i].to_str().unwrap()];
                peers[i].spawn_submit(&artifact("primes"), &args, jobs[i].0.as_bytes())
            })
            .collect();
        // When each ends, from the common start.
        let mut ends = [None, None];
        while ends.iter().any(Option::is_none) {
            assert!(start.elapsed() < T, "the jobs did not end within {T:?}");
            for (i, run) in runs.iter_mut().enumerate() {
                if ends[i].is_none() && !run.running() {
                    ends[i] = Some(start.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let ended: Vec<(Duration, std::process::Output)> = runs
            .into_iter()
            .zip(ends)
            .map(|(run, end)| (end.unwrap(), run.finish(T)))
            .collect();
        for (i, (_, out)) in ended.iter().enumerate() {
            assert!(out.status.success(), "job {i}: {}", text(&out.stderr));
            assert_eq!(text(&out.stdout), jobs[i].1.to_string(), "job {i}'s result");
        }
        let (first, last) = (ended[0].0.min(ended[1].0), ended[0].0.max(ended[1].0));
        let work: Vec<Vec<u64>> = stats.iter().map(|s| per_peer(s, &peers)).collect();
        assert!(
            last.as_secs_f64() <= first.as_secs_f64() * 1.15,
            "one job ended at {first:?}, the other at {last:?}; taskunits per peer (a, b, c, d): {work:?}"
        );
        // Every peer worked on both, each master's own slot on the other's
        // job too.
        for (i, w) in work.iter().enumerate() {
            assert!(
                w.iter().all(|n| *n > 0),
                "job {i}: a peer did none of it: {w:?}"
            );
        }
    });
}

#[test]
fn fair_a_small_job_submitted_during_a_long_one_gets_its_share_at_once() {
    alone(|| {
        let dir = scratch();
        let peers = four_peers(dir.path());
        let (small, small_want) = primes_input(40, 300_000);
        // The small job alone on the mesh, for comparison.
        let stats = dir.path().join("alone.json");
        let args = ["--stats-json", stats.to_str().unwrap()];
        let started = Instant::now();
        let out = peers[1].submit(&artifact("primes"), &args, small.as_bytes());
        let alone_took = started.elapsed();
        assert!(out.status.success(), "{}", text(&out.stderr));

        // A long job from a, about fifteen times the small one's work.
        let (long, long_want) = primes_input(600, 300_100);
        let long_run = peers[0].spawn_submit(&artifact("primes"), &[], long.as_bytes());
        std::thread::sleep(Duration::from_secs(2));
        let stats = dir.path().join("small.json");
        let args = ["--stats-json", stats.to_str().unwrap()];
        let started = Instant::now();
        let out = peers[1].submit(&artifact("primes"), &args, small.as_bytes());
        let shared_took = started.elapsed();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), small_want.to_string());
        let work = per_peer(&stats, &peers);
        // Every slot gave the small job some of its time at once, the long
        // job's master's own included, while the long job went on.
        assert!(
            work.iter().all(|n| *n > 0),
            "a peer did none of the small job: {work:?}"
        );
        let long_out = long_run.finish(T);
        assert!(long_out.status.success(), "{}", text(&long_out.stderr));
        assert_eq!(text(&long_out.stdout), long_want.to_string());
        // Half of every slot: about twice its time alone (three times
        // leaves room for the mesh's own noise, and is well under the
        // four times of one slot, or the wait for the long job to end).
        assert!(
            shared_took.as_secs_f64() <= alone_took.as_secs_f64() * 3.0,
            "alone {alone_took:?}, beside the long job {shared_took:?}; taskunits per peer {work:?}"
        );
    });
}

//! Private meshes (pre-shared key) and the master allowlist.

use std::time::Duration;

use crate::common::*;

#[test]
fn a_mesh_key_keeps_outsiders_out() {
    let dir = scratch();
    let key = write_key(dir.path(), "mesh.key", 7);
    let other = write_key(dir.path(), "other.key", 99);
    let a = PeerProc::loopback(dir.path(), "a", &["--mesh-key", &key]);
    let b = PeerProc::loopback(
        dir.path(),
        "b",
        &["--mesh-key", &key, "--bootstrap", a.addr()],
    );
    let outsider = PeerProc::loopback(dir.path(), "c", &["--bootstrap", a.addr()]);
    let wrong_key = PeerProc::loopback(
        dir.path(),
        "d",
        &["--mesh-key", &other, "--bootstrap", a.addr()],
    );
    eventually(Duration::from_secs(20), "b joins with the key", || {
        connected(&a, &b)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!connected(&a, &outsider), "a peer without the key got in");
    assert!(!connected(&a, &wrong_key), "a peer with another key got in");
    assert!(!connected(&outsider, &a));
}

#[test]
fn workers_only_serve_allowed_masters() {
    let dir = scratch();
    let ident = dir.path().join("m.id");
    let m = PeerProc::loopback(dir.path(), "m", &["--identity", ident.to_str().unwrap()]);
    // The identity persists: a restart keeps the peer id.
    let id = m.peer_id.clone();
    drop(m);
    let m = PeerProc::loopback(dir.path(), "m", &["--identity", ident.to_str().unwrap()]);
    assert_eq!(m.peer_id, id, "same identity file, same peer id");
    let w = PeerProc::loopback(
        dir.path(),
        "w",
        &["--bootstrap", m.addr(), "--allow-master", &m.peer_id],
    );
    let x = PeerProc::loopback(dir.path(), "x", &["--bootstrap", m.addr()]);
    eventually(Duration::from_secs(20), "mesh formed", || {
        connected(&m, &w) && connected(&m, &x)
    });
    let input: String = (0..60).map(|i| format!("{}\n", 200_000 + i)).collect();
    let job = |master: &PeerProc| {
        let stats = dir.path().join(format!("{}.json", master.peer_id));
        let out = master.submit(
            &artifact("primes"),
            &["--stats-json", stats.to_str().unwrap()],
            input.as_bytes(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        stats_of(&stats)
    };
    let from_x = job(&x);
    assert!(
        !from_x["per_peer"]
            .as_object()
            .unwrap()
            .contains_key(&w.peer_id),
        "w worked for a master not on its allowlist: {from_x}"
    );
    let from_m = job(&m);
    assert!(
        from_m["per_peer"]
            .as_object()
            .unwrap()
            .contains_key(&w.peer_id),
        "w did not work for its allowed master: {from_m}"
    );
}

#[test]
fn replicated_taskunits_run_on_distinct_peers_and_mismatches_are_caught() {
    let dir = scratch();
    let a = PeerProc::loopback(dir.path(), "a", &[]);
    let b = PeerProc::loopback(dir.path(), "b", &["--bootstrap", a.addr()]);
    eventually(Duration::from_secs(20), "mesh formed", || connected(&a, &b));
    // Three replicas need three peers: a clear error, not a job that waits forever.
    let out = a.submit(&artifact("primes"), &["--replicate", "3"], b"100\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--replicate 3 needs 3 peers, but this peer sees 2"),
        "{}",
        text(&out.stderr)
    );
    // Deterministic work: every taskunit runs on both peers, results agree.
    let ns: Vec<u64> = (0..30).map(|i| 20_000 + i).collect();
    let input: String = ns.iter().map(|n| format!("{n}\n")).collect();
    let stats = dir.path().join("s.json");
    let out = a.submit(
        &artifact("primes"),
        &["--replicate", "2", "--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        count_primes_below(&ns).iter().sum::<u64>().to_string()
    );
    let s = stats_of(&stats);
    let per_peer = s["per_peer"].as_object().unwrap();
    assert_eq!(per_peer[&a.peer_id], 30, "{per_peer:?}");
    assert_eq!(per_peer[&b.peer_id], 30, "{per_peer:?}");
    assert_eq!(s["mismatches"], 0);
    // A nondeterministic taskunit: replicas disagree, it is re-run, then fails.
    let out = a.submit(
        &artifact("faulty"),
        &[
            "--replicate",
            "2",
            "--attempts",
            "2",
            "--keep-going",
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        b"x\nrandom\ny\n",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(text(&out.stdout), "X\nY");
    assert!(
        stderr
            .contains("taskunit 1 failed: the 2 replicas of this taskunit gave different results"),
        "{stderr}"
    );
    assert_eq!(stats_of(&stats)["mismatches"], 2);
}

/// Spot checks judge no one for a job whose results vary between runs
/// (here, random numbers): the master's own two runs of a taskunit differ
/// from each other, so checks stop for the job, the workers' results are
/// taken as they are and the stats say checks stopped.
#[test]
fn spot_checks_stop_for_a_job_whose_results_vary() {
    let dir = scratch();
    let a = PeerProc::loopback(dir.path(), "a", &[]);
    let b = PeerProc::loopback(dir.path(), "b", &["--bootstrap", a.addr()]);
    let input = "random\n".repeat(2000);
    let stats = dir.path().join("s.json");
    let mut tried = Vec::new();
    for _ in 0..5 {
        let out = a.submit(
            &artifact("faulty"),
            &["--verify", "1", "--stats-json", stats.to_str().unwrap()],
            input.as_bytes(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let s = stats_of(&stats);
        assert!(
            s["caught"].as_object().is_none_or(|c| c.is_empty()),
            "an honest worker was judged: {s}"
        );
        if s["per_peer"].get(&b.peer_id).is_some() {
            assert_eq!(s["verify_stopped"], true, "{s}");
            assert_eq!(s["tasks"], 2000);
            return;
        }
        tried.push(s);
    }
    panic!("b never took part: {tried:?}");
}

/// `--deterministic`: a taskunit gives the same bytes on every peer and in
/// every run, though it draws random numbers (a Rust job's `RandomState`,
/// Python's `random`) and reads the clock; taskunits differ from each
/// other. Two replicas on two peers agree on every one.
#[test]
fn a_deterministic_job_gives_the_same_bytes_everywhere() {
    let dir = scratch();
    let a = PeerProc::loopback(dir.path(), "a", &[]);
    let b = PeerProc::loopback(dir.path(), "b", &["--bootstrap", a.addr()]);
    eventually(Duration::from_secs(20), "mesh formed", || connected(&a, &b));
    let input = "random\n".repeat(200);
    let stats = dir.path().join("s.json");
    let run_once = || {
        let out = a.submit(
            &artifact("faulty"),
            &[
                "--deterministic",
                "--replicate",
                "2",
                "--stats-json",
                stats.to_str().unwrap(),
            ],
            input.as_bytes(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let s = stats_of(&stats);
        assert_eq!(s["mismatches"], 0, "the replicas agree: {s}");
        assert_eq!(s["per_peer"][&b.peer_id], 200, "b ran every replica: {s}");
        text(&out.stdout)
    };
    let first = run_once();
    let distinct: std::collections::HashSet<&str> = first.lines().collect();
    assert!(
        distinct.len() > 190,
        "taskunits draw their own numbers: {first}"
    );
    assert_eq!(run_once(), first, "the same bytes in every run");

    let job = dir.path().join("draw.py");
    std::fs::write(
        &job,
        "import random, time\n\ndef processor(x):\n    return f'{random.random()} {time.time()}'\n",
    )
    .unwrap();
    let python = || {
        let out = submit_local(&job, &["--deterministic"], "x\n".repeat(20).as_bytes());
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let drawn = python();
    assert_eq!(
        drawn
            .lines()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        20,
        "{drawn}"
    );
    assert!(
        drawn.lines().all(|l| l.ends_with(" 1767225600.0")),
        "{drawn}"
    );
    assert_eq!(python(), drawn);
}

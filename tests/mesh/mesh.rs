//! Several real peer processes: loopback with explicit bootstrap, mDNS
//! across network namespaces, and a peer killed mid-job.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(300);

#[test]
fn three_peers_share_a_job_submitted_from_a_non_bootstrap_peer() {
    let dir = scratch();
    let a = PeerProc::loopback(dir.path(), "a", &[]);
    let b = PeerProc::loopback(dir.path(), "b", &["--bootstrap", a.addr()]);
    let c = PeerProc::loopback(dir.path(), "c", &["--bootstrap", a.addr()]);
    // `antnest peers` on c sees a (its bootstrap) connected, and b, which
    // it only learns of through a: the job below is to be shared by all
    // three, so it waits until the mesh has formed.
    let peers_of = |p: &PeerProc| {
        let out = run(&["peers", "--control", p.control.to_str().unwrap()], b"", T);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    eventually_or(Duration::from_secs(20), "c connected to a and b", || {
        let listed = peers_of(&c);
        let met = [&a.peer_id, &b.peer_id].iter().all(|id| {
            listed
                .lines()
                .any(|l| l.starts_with(id.as_str()) && l.contains(" connected"))
        });
        if met {
            return Ok(());
        }
        // What each peer knows, to tell which step of discovery is missing.
        Err(format!(
            "a={} b={} c={}\na knows:\n{}b knows:\n{}c knows:\n{listed}",
            a.peer_id,
            b.peer_id,
            c.peer_id,
            peers_of(&a),
            peers_of(&b)
        ))
    });
    // ~100 taskunits of a few ms each: long enough for everyone to join in.
    let (input, want) = primes_input(160, 30_000);
    let stats = dir.path().join("s.json");
    let out = c.submit(
        &artifact("primes"),
        &["--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        want.to_string(),
        "same result as a local run"
    );
    let s = stats_of(&stats);
    let per_peer = s["per_peer"].as_object().unwrap();
    for p in [&a, &b, &c] {
        assert!(
            per_peer
                .get(&p.peer_id)
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
                > 0,
            "peer {} did no work: {per_peer:?}",
            p.peer_id
        );
    }
    assert_eq!(
        per_peer.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        160
    );
}

#[test]
fn a_peer_killed_mid_job_loses_no_work() {
    let dir = scratch();
    let a = PeerProc::loopback(dir.path(), "a", &[]);
    let mut b = PeerProc::loopback(dir.path(), "b", &["--bootstrap", a.addr()]);
    let _c = PeerProc::loopback(dir.path(), "c", &["--bootstrap", a.addr()]);
    // ~150 taskunits of ~40 ms: a few seconds of work for three peers.
    let (input, want) = primes_input(150, 300_000);
    let stats = dir.path().join("s.json");
    let mut job = a.spawn_submit(
        &artifact("primes"),
        &["--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    // Let b take work, then kill it without warning, mid-job.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(job.running(), "the job must still be running when b dies");
    b.kill();
    let out = job.finish(T);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want.to_string());
    let s = stats_of(&stats);
    assert_eq!(s["tasks"], 150);
    assert_eq!(s["failed"], 0);
    let per_peer = s["per_peer"].as_object().unwrap();
    assert_eq!(
        per_peer.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        150
    );
}

#[test]
fn mdns_finds_peers_with_no_config_across_namespaces() {
    let Some(net) = lan(2, "mDNS test") else {
        return;
    };
    let dir = scratch();
    let a = PeerProc::start_with(
        antnest_in(&net, 0),
        dir.path(),
        "a",
        &["--listen", "/ip4/0.0.0.0/tcp/0", "--slots", "1"],
    );
    let b = PeerProc::start_with(
        antnest_in(&net, 1),
        dir.path(),
        "b",
        &["--listen", "/ip4/0.0.0.0/tcp/0", "--slots", "1"],
    );
    eventually(Duration::from_secs(30), "mDNS discovery", || {
        connected(&b, &a)
    });
    // Once identified, a is listed at its address on the link, and not at
    // its loopback address, which is of no use from b's host.
    eventually(Duration::from_secs(30), "a's address on the link", || {
        let out = run(&["peers", "--control", b.control.to_str().unwrap()], b"", T);
        let listed = text(&out.stdout);
        let line = listed
            .lines()
            .find(|l| l.starts_with(&a.peer_id))
            .unwrap_or_default();
        assert!(
            !line.contains("/ip4/127."),
            "a loopback address of another host: {line}"
        );
        line.contains(&format!("/ip4/{}/", net.ip(0)))
    });
    let (input, want) = primes_input(120, 30_000);
    let stats = dir.path().join("s.json");
    let out = run_cmd(
        antnest_in(&net, 1).args([
            "submit",
            "--control",
            b.control.to_str().unwrap(),
            artifact("primes").to_str().unwrap(),
            "--stats-json",
            stats.to_str().unwrap(),
        ]),
        input.as_bytes(),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want.to_string());
    let s = stats_of(&stats);
    let per_peer = s["per_peer"].as_object().unwrap();
    assert!(
        per_peer.contains_key(&a.peer_id),
        "the discovered peer worked: {per_peer:?}"
    );
    assert!(per_peer.contains_key(&b.peer_id), "{per_peer:?}");
}

/// A master killed mid-job resumes it (`--resume`) without computing again
/// what its journal holds, and a journal damaged meanwhile costs only the
/// damaged records and those after them, never a wrong result.
#[test]
fn a_crashed_master_resumes_without_recomputing() {
    let dir = scratch();
    let cache = dir.path().join("cache");
    let start = || {
        let mut cmd = antnest();
        cmd.env("ANTNEST_CACHE", &cache);
        PeerProc::start_with(cmd, dir.path(), "m", &LOOPBACK_PEER)
    };
    let mut m = start();
    // ~100 taskunits of ~40 ms on one slot: about 4 s of work.
    let (input, want) = primes_input(100, 300_000);
    let input_file = dir.path().join("in.txt");
    std::fs::write(&input_file, &input).unwrap();
    let primes = artifact("primes");
    let submit_args = |extra: &[&str]| {
        let mut v = vec![
            "submit".to_string(),
            "--control".into(),
            m_control(dir.path()),
            primes.to_str().unwrap().into(),
            "--input".into(),
            input_file.to_str().unwrap().into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = submit_args(&[]);
    let mut first = spawn_antnest(&args.iter().map(String::as_str).collect::<Vec<_>>(), b"");
    let job_id = first.job_id(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        first.running(),
        "the job must still run when the master dies"
    );
    m.kill();
    let first_out = first.finish(T);
    assert!(
        !first_out.status.success(),
        "the submitter notices the master died"
    );

    // The journal is damaged while the master is down: a byte flipped in
    // a record three quarters in, and 12 zero bytes appended (which a
    // journal without checksums would read as an empty result for
    // taskunit 0). The records before the flipped one are resumed; it
    // and all after it are computed again.
    let results = cache.join("journal").join(&job_id).join("results");
    let mut journal = std::fs::read(&results).expect("the crashed job's journal");
    let (mut at, mut intact) = (0, 0);
    let flipped = journal.len() * 3 / 4;
    while at + 16 <= journal.len() {
        let len = u32::from_le_bytes(journal[at + 8..at + 12].try_into().unwrap()) as usize;
        if at + 16 + len > flipped {
            break;
        }
        at += 16 + len;
        intact += 1;
    }
    journal[flipped] ^= 0xff;
    journal.extend([0; 12]);
    std::fs::write(&results, &journal).unwrap();

    let _m = start();
    let stats = dir.path().join("s.json");
    let out = run(
        &submit_args(&["--resume", &job_id, "--stats-json", stats.to_str().unwrap()])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        b"",
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want.to_string());
    let s = stats_of(&stats);
    let resumed = s["resumed"].as_u64().unwrap();
    assert!(resumed > 0 && resumed < 100, "resumed {resumed} of 100");
    assert_eq!(resumed, intact, "the records before the damage, no more");
    let computed: u64 = s["per_peer"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        computed,
        100 - resumed,
        "nothing done before the crash was recomputed"
    );
    // The journal is gone once the job is done.
    let again = run(
        &submit_args(&["--resume", &job_id])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        b"",
        T,
    );
    assert!(
        text(&again.stderr).contains("no journal for job"),
        "{}",
        text(&again.stderr)
    );
}

fn m_control(dir: &std::path::Path) -> String {
    dir.join("m.sock").to_str().unwrap().to_string()
}

/// Keeps a process stopped (SIGSTOP) 9 ms of every 10 until dropped: it
/// runs at about a tenth of its speed, without loading the machine, and
/// still answers a request within a few of its windows.
struct Throttle {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn on(pid: u32) -> Throttle {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let pid = pid as libc::pid_t;
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: signals a child process of this test by its pid.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_millis(9));
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Throttle {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_worker_that_slows_down_mid_job_gives_back_what_it_has_not_started() {
    // Peers are timed against each other: no other test's peers meanwhile.
    alone(slows_down_mid_job);
}

fn slows_down_mid_job() {
    let dir = scratch();
    let a = PeerProc::loopback(dir.path(), "a", &[]);
    let b = PeerProc::loopback(dir.path(), "b", &["--bootstrap", a.addr()]);
    eventually(Duration::from_secs(30), "b connected to a", || {
        connected(&b, &a)
    });
    // W2's shape: 64 taskunits of a few ms. The first job times both
    // peers at full speed; the master shares the second by those times.
    let (input, want) = primes_input(64, 52_000);
    let job = |name: &str| {
        let stats = dir.path().join(name);
        let out = a.submit(
            &artifact("primes"),
            &["--stats-json", stats.to_str().unwrap()],
            input.as_bytes(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), want.to_string());
        stats_of(&stats)
    };
    // Other tests load the machine meanwhile: calibrate until b has had
    // a fair part of a job (its pace then gives it a fair part of the next).
    let fair = (1..=5).any(|i| {
        let first = job(&format!("first{i}.json"));
        first["per_peer"]
            .get(&b.peer_id)
            .and_then(|v| v.as_u64())
            .is_some_and(|n| n >= 16)
    });
    if !fair {
        eprintln!("skipped: b never had 16 of 64 taskunits; the machine is too loaded to time it");
        return;
    }
    // Now b runs at about a tenth of its speed, holding a share of the
    // next job sized for full speed. On a loaded machine b's answer to the
    // ask can come after a's slot has already run b's taskunits as backups
    // and the job has ended (nothing then counts as taken back): up to
    // six tries, each of which must still run every taskunit once.
    let mut seen = Vec::new();
    for i in 0..6 {
        let throttle = Throttle::on(b.child.id());
        let second = job(&format!("second{i}.json"));
        drop(throttle);
        let per_peer = second["per_peer"].as_object().unwrap();
        assert_eq!(
            per_peer.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
            64,
            "every taskunit run once: {second}"
        );
        assert!(
            per_peer[&a.peer_id].as_u64().unwrap() > 32,
            "a ran more than half, the taskunits it took back included: {second}"
        );
        let taken_back = second["taken_back"].as_u64().unwrap();
        seen.push(second);
        if taken_back >= 1 {
            return;
        }
    }
    panic!(
        "a's slot ran out while b held taskunits it had not started, and took none back in six jobs: {seen:?}"
    );
}

/// A worker compiling one master's module (a Python component, which
/// takes a while) still works on another master's job meanwhile: no slot
/// waits on a module it does not need.
#[test]
fn a_module_being_compiled_does_not_hold_up_other_masters_jobs() {
    let dir = scratch();
    let a = PeerProc::loopback(dir.path(), "a", &[]);
    let b = PeerProc::loopback(dir.path(), "b", &["--bootstrap", a.addr()]);
    // A cache of its own: w has to compile a's Python job itself.
    let (w, _) = PeerProc::own_cache_worker(dir.path(), "w", &a, &[]);
    eventually(Duration::from_secs(30), "w connected to a and b", || {
        connected(&w, &a) && connected(&w, &b)
    });
    let python = a.spawn_submit(
        std::path::Path::new("jobs/reverse_strings.py"),
        &[],
        b"one\ntwo\nthree\n",
    );
    // a announces its job once its split runs; w then starts compiling.
    std::thread::sleep(Duration::from_secs(3));
    let (input, want) = primes_input(200, 200_000);
    let stats = dir.path().join("b.json");
    let out = b.submit(
        &artifact("primes"),
        &["--stats-json", stats.to_str().unwrap()],
        input.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), want.to_string());
    let s = stats_of(&stats);
    assert!(
        s["per_peer"]
            .get(&w.peer_id)
            .and_then(|n| n.as_u64())
            .unwrap_or(0)
            > 0,
        "w did none of b's job while compiling a's module: {s}"
    );
    let out = python.finish(T);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "eno\nowt\neerht");
}

//! What users expect around a job: streaming results, JSON output, listing
//! and cancelling jobs, shell completions.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(300);

#[test]
fn stream_prints_each_result_as_it_arrives() {
    let out = submit_local(&artifact("faulty"), &["--stream", "-q"], b"a\nb\nc\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(lines, ["A", "B", "C"]);
}

#[test]
fn json_gives_output_stats_and_failures() {
    let out = submit_local(
        &artifact("faulty"),
        &["--json", "--keep-going", "--attempts", "1"],
        b"hello\ntrap\nworld\n",
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["output"], "HELLO\nWORLD");
    assert_eq!(v["stats"]["tasks"], 3);
    assert_eq!(v["failures"][0]["taskunit"], 1);
    assert!(
        v["failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("asked to trap"),
        "{v}"
    );
}

#[test]
fn jobs_lists_and_cancel_stops_a_running_job() {
    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &[]);
    let control = peer.control.to_str().unwrap().to_string();
    let input: String = (0..400).map(|i| format!("{}\n", 300_000 + i)).collect();
    let mut job = spawn_antnest(
        &[
            "submit",
            "--control",
            &control,
            artifact("primes").to_str().unwrap(),
        ],
        input.as_bytes(),
    );
    let id = job.job_id(Duration::from_secs(60));
    let listed = run(&["jobs", "--control", &control], b"", T);
    assert!(
        text(&listed.stdout).starts_with(&id),
        "{}",
        text(&listed.stdout)
    );
    let cancelled = run(&["cancel", &id, "--control", &control], b"", T);
    assert!(cancelled.status.success(), "{}", text(&cancelled.stderr));
    let out = job.finish(Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("the job was cancelled"),
        "{}",
        text(&out.stderr)
    );
    let again = run(&["cancel", &id, "--control", &control], b"", T);
    assert_eq!(
        again.status.code(),
        Some(1),
        "a finished job cannot be cancelled"
    );
    let listed = run(&["jobs", "--control", &control], b"", T);
    assert!(
        text(&listed.stdout).trim().is_empty(),
        "{}",
        text(&listed.stdout)
    );
}

#[test]
fn completions_are_generated() {
    let out = run(&["completions", "bash"], b"", T);
    assert!(out.status.success());
    let script = text(&out.stdout);
    assert!(
        script.contains("antnest") && script.contains("submit") && script.contains("--stats-json")
    );
}

#[test]
fn guest_stderr_reaches_the_submitter() {
    let out = submit_local(&artifact("faulty"), &[], b"say\nx\nsay\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "SAID\nX\nSAID");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("antnest: taskunit 0: hello from the guest"),
        "{stderr}"
    );
    assert!(
        stderr.contains("antnest: taskunit 2: hello from the guest"),
        "{stderr}"
    );
    assert!(!stderr.contains("taskunit 1:"), "{stderr}");
    let quiet = submit_local(&artifact("faulty"), &["-q"], b"say\n");
    assert!(!text(&quiet.stderr).contains("hello from the guest"));
}

/// `submit` gives a running peer the module's hash first and its bytes only
/// when the peer lacks them: the second submission of a job sends none.
#[test]
fn a_peer_that_has_the_module_gets_only_its_hash() {
    let dir = scratch();
    let cache = dir.path().join("cache");
    let peer = PeerProc::loopback(dir.path(), "p", &["--cache-dir", cache.to_str().unwrap()]);
    let job = artifact("reverse_strings");
    let module_sent = |name: &str| {
        let stats = dir.path().join(format!("{name}.json"));
        let out = peer.submit(
            &job,
            &["--stats-json", stats.to_str().unwrap()],
            b"ab\ncd\n",
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "ba\ndc");
        stats_of(&stats)["module_sent"]
            .as_bool()
            .expect("module_sent")
    };
    assert!(
        module_sent("first"),
        "a peer with an empty cache needs the bytes"
    );
    assert!(
        !module_sent("second"),
        "the second time, the hash is enough"
    );
}

/// A peer started with no `--listen` takes antnest's well-known port when
/// it is free; a worker whose config file has the original's name
/// (`config/<hostname>-slave-config.json`) and names that master without a
/// port finds it there.
#[test]
fn the_original_slave_config_finds_a_master_at_the_default_port() {
    let dir = scratch();
    let free = std::net::TcpListener::bind(("0.0.0.0", 4001)).is_ok();
    let a = PeerProc::start(dir.path(), "a", &["--no-mdns", "--slots", "1"]);
    if !free {
        // Taken by something else on this machine: a random port instead.
        assert!(
            a.addrs.iter().all(|addr| !addr.contains("/tcp/4001/")),
            "{:?}",
            a.addrs
        );
        eprintln!("port 4001 is in use here: the config half of this test is not run");
        return;
    }
    assert!(
        a.addrs.iter().any(|addr| addr.contains("/tcp/4001/")),
        "{:?}",
        a.addrs
    );
    let cwd = dir.path().join("worker");
    std::fs::create_dir_all(cwd.join("config")).unwrap();
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    std::fs::write(
        cwd.join("config").join(format!("{host}-slave-config.json")),
        r#"{"masters": [{"ip": "127.0.0.1", "hostname": "master"}]}"#,
    )
    .unwrap();
    let mut cmd = antnest();
    cmd.current_dir(&cwd);
    let b = PeerProc::start_with(cmd, dir.path(), "b", &LOOPBACK_PEER);
    eventually_or(Duration::from_secs(20), "b connected to a", || {
        let out = run(&["peers", "--control", b.control.to_str().unwrap()], b"", T);
        let listed = text(&out.stdout);
        listed
            .lines()
            .any(|l| l.starts_with(a.peer_id.as_str()) && l.contains(" connected"))
            .then_some(())
            .ok_or(listed)
    });
}

/// The control socket is this user's only: made with mode 0600, and a
/// socket another user put where the client looks is not used.
#[test]
fn the_control_socket_is_private_to_its_user() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = scratch();
    let p = PeerProc::loopback(dir.path(), "p", &[]);
    let mode = std::fs::metadata(&p.control).unwrap().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // Someone else's socket (only root can make one here).
    let theirs = dir.path().join("theirs.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&theirs).unwrap();
    let path = std::ffi::CString::new(theirs.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; chown has no other preconditions.
    if unsafe { libc::chown(path.as_ptr(), 65534, 65534) } != 0 {
        eprintln!("not root: the foreign-socket half of this test is not run");
        return;
    }
    let out = run(&["jobs", "--control", theirs.to_str().unwrap()], b"", T);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("uid 65534"),
        "{}",
        text(&out.stderr)
    );
}

/// A job cannot be resumed while it runs: the second submission is
/// refused and the first goes on to its result.
#[test]
fn resuming_a_running_job_is_refused() {
    let dir = scratch();
    let p = PeerProc::loopback(dir.path(), "p", &[]);
    let numbers: String = (1_000_000..1_000_008).map(|n| format!("{n}\n")).collect();
    let mut first = p.spawn_submit(&artifact("primes"), &[], numbers.as_bytes());
    let id = first.job_id(T);
    let again = p.submit(&artifact("primes"), &["--resume", &id], numbers.as_bytes());
    assert_eq!(again.status.code(), Some(1), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("is running"),
        "{}",
        text(&again.stderr)
    );
    let out = first.finish(T);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// While the split of a job from a file still runs (it stays 4096
/// taskunits ahead of the workers), `antnest jobs` tells how far the job
/// is from the share of the input split so far: a percentage and an
/// estimated total close to the real one.
#[test]
fn progress_tells_how_far_a_job_from_a_file_is() {
    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &[]);
    let control = peer.control.to_str().unwrap().to_string();
    let input = dir.path().join("in.txt");
    let units = 8000;
    let lines: String = (0..units)
        .map(|i| format!("{}\n", 20_000 + i % 7))
        .collect();
    std::fs::write(&input, lines).unwrap();
    let mut job = spawn_antnest(
        &[
            "submit",
            "--control",
            &control,
            "--input",
            input.to_str().unwrap(),
            artifact("primes").to_str().unwrap(),
        ],
        b"",
    );
    let id = job.job_id(Duration::from_secs(60));
    // The split's first taskunits come a moment after the job starts.
    let estimated = |line: &str| {
        line.split_whitespace()
            .find_map(|w| w.split_once("/~").map(|(_, t)| t.parse::<u64>().unwrap()))
    };
    let mut line = String::new();
    for _ in 0..30 {
        line = text(&run(&["jobs", "--control", &control], b"", T).stdout);
        if estimated(&line).is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(line.starts_with(&id), "{line}");
    let estimate = estimated(&line)
        .unwrap_or_else(|| panic!("no estimated total while the split runs: {line}"));
    assert!(
        estimate.abs_diff(units) <= units / 10,
        "estimated {estimate} taskunits of {units}: {line}"
    );
    assert!(line.contains('%') && line.contains('['), "{line}");
    let out = job.finish(Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The first lines of a submit say which job it is and how to resume it,
/// then what runs where: the module (name, hash prefix, compiled or
/// cached), the peers connected and the slots of the submitting peer.
#[test]
fn the_first_lines_say_what_runs_where() {
    let job = artifact("reverse_strings");
    let hash = antnest_proto::ModuleHash::of(&std::fs::read(&job).unwrap()).to_string();
    let out = submit_local(&job, &["--slots", "3"], b"abc\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let mut lines = stderr.lines();
    let first = lines.next().unwrap_or_default();
    let id = first
        .strip_prefix("antnest: job ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(
        first,
        format!("antnest: job {id} (resume it after a crash with --resume {id})")
    );
    let second = lines.next().unwrap_or_default();
    assert!(
        second.starts_with(&format!(
            "antnest: module reverse_strings.wasm ({}…, ",
            &hash[..12]
        )),
        "{stderr}"
    );
    assert!(
        second.ends_with("), 0 peers connected, 3 slots here"),
        "{stderr}"
    );
}

/// With `--json`, stderr carries the job's events as JSON lines: started,
/// setup, and progress with the figures of the text line (done, total,
/// fraction, ETA) while the job runs.
#[test]
fn json_progress_events_carry_the_figures() {
    // ~50 taskunits of ~20 ms on one slot: a second or so of progress.
    let input: String = (0..50).map(|i| format!("{}\n", 200_000 + i)).collect();
    let out = submit_local(
        &artifact("primes"),
        &["--json", "--slots", "1"],
        input.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(events[0]["event"], "started", "{events:?}");
    assert_eq!(events[1]["event"], "setup", "{events:?}");
    assert_eq!(events[1]["slots"], 1);
    let progress: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "progress").collect();
    assert!(!progress.is_empty(), "no progress event: {events:?}");
    for p in &progress {
        let f = p["fraction"]
            .as_f64()
            .expect("a fraction: the input's size is known");
        assert!((0.0..=1.0).contains(&f), "{p}");
        assert!(p["done"].as_u64().unwrap() <= 50, "{p}");
        assert_eq!(p["input_size"], input.len(), "{p}");
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["stats"]["tasks"], 50);
}

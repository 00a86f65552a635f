//! Misbehaving jobs give clear per-task errors; the other taskunits finish.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(300);

fn submit_faulty(input: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--task-timeout",
        "1s",
        "--memory-mb",
        "64",
        "--max-output-mb",
        "1",
        "--attempts",
        "1",
    ];
    args.extend_from_slice(extra);
    submit_local(&artifact("faulty"), &args, input.as_bytes())
}

#[test]
fn loop_bomb_trap_and_huge_output_fail_alone() {
    let dir = scratch();
    let stats = dir.path().join("s.json");
    let out = submit_faulty(
        "a\nloop\nb\nbomb\ntrap\nbig\nexit\nc\n",
        &["--keep-going", "--stats-json", stats.to_str().unwrap()],
    );
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "failures give exit code 1: {stderr}"
    );
    assert_eq!(
        text(&out.stdout),
        "A\nB\nC",
        "the good taskunits still finish"
    );
    assert!(stderr.contains("taskunit 1 failed: timed out"), "{stderr}");
    assert!(
        stderr.contains("taskunit 3 failed: out of memory"),
        "{stderr}"
    );
    assert!(
        stderr.contains("taskunit 4 failed: trap") && stderr.contains("asked to trap"),
        "{stderr}"
    );
    assert!(
        stderr.contains("taskunit 5 failed: output too large"),
        "{stderr}"
    );
    assert!(
        stderr.contains("taskunit 6 failed: trap: the job called exit("),
        "{stderr}"
    );
    let s = stats_of(&stats);
    assert_eq!(s["tasks"], 8);
    assert_eq!(s["failed"], 5);
}

/// The input file is mapped, not read: when it shrinks while the job runs,
/// the job fails with a clear error instead of using taskunits that lost
/// their bytes, and the peer (here `submit`'s own) survives the SIGBUS.
#[test]
fn an_input_file_that_shrinks_mid_job_fails_the_job_not_the_peer() {
    let dir = scratch();
    let input = dir.path().join("in.txt");
    // The first taskunit keeps the only slot busy until its timeout; the
    // others, on pages past the first, are still to run when the file shrinks.
    std::fs::write(&input, format!("loop\n{}", "a\n".repeat(100_000))).unwrap();
    let faulty = artifact("faulty");
    let mut args = vec!["submit"];
    args.extend(LOCAL);
    args.extend([
        faulty.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--slots",
        "1",
        "--task-timeout",
        "2s",
        "--attempts",
        "1",
        "--keep-going",
    ]);
    let mut job = spawn_antnest(&args, b"");
    job.job_id(T);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&input)
        .unwrap()
        .set_len(5)
        .unwrap();
    let out = job.finish(T);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a job failure, not a crash: {stderr}"
    );
    assert!(
        stderr.contains("the input file changed while the job ran"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no output from a changed input");
}

#[test]
fn a_failing_taskunit_fails_the_job_with_its_error() {
    let out = submit_faulty("a\ntrap\nb\n", &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("job failed: 1 of 3 taskunits failed"),
        "{stderr}"
    );
    assert!(stderr.contains("asked to trap"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn invalid_module_is_a_clear_error() {
    let dir = scratch();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x0d\0\x01\0 definitely not a component").unwrap();
    let out = submit_local(&bad, &[], b"x\n");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the job module is not usable"), "{stderr}");
}

#[test]
fn unknown_job_kind_is_a_usage_error() {
    let out = run(&["submit", "--standalone", "Cargo.lock"], b"", T);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("is not a job"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_oversized_taskunit_is_a_clear_error() {
    let mut input = vec![b'a'; 17 << 20];
    input.push(b'\n');
    let out = submit_local(&artifact("reverse_strings"), &[], &input);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("split failed") && stderr.contains("16777216"),
        "{stderr}"
    );
}

#[test]
fn a_peer_refuses_jobs_beyond_max_jobs() {
    let dir = scratch();
    let peer = PeerProc::loopback(dir.path(), "p", &["--max-jobs", "1"]);
    let control = peer.control.to_str().unwrap().to_string();
    let primes = artifact("primes");
    let input: String = (0..80).map(|i| format!("{}\n", 300_000 + i)).collect();
    let mut long = spawn_antnest(
        &["submit", "--control", &control, primes.to_str().unwrap()],
        input.as_bytes(),
    );
    long.job_id(Duration::from_secs(60));
    let out = run(
        &["submit", "--control", &control, primes.to_str().unwrap()],
        b"100\n",
        T,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already runs 1 jobs"), "{stderr}");
    let first = long.finish(T);
    assert!(first.status.success(), "the running job is unaffected");
}

/// Threads asking for the same module at once (a job's submit and a worker
/// slot, say) all get it, and it is compiled once. Two compiles of one
/// module used to race on the artifact's temporary file and fail a job
/// with "No such file or directory".
#[test]
fn threads_loading_one_module_at_once_compile_it_once() {
    use antnest_proto::ModuleHash;
    use antnest_sandbox::Sandbox;

    let bytes = std::fs::read(artifact("primes")).expect("primes.wasm");
    let hash = ModuleHash::of(&bytes);
    let cache = tempfile::tempdir().unwrap();
    let env = Sandbox::new(Some(cache.path().to_owned())).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..4 {
        let (env, bytes, tx) = (env.clone(), bytes.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send(env.component(&hash, || Some(bytes)).map(drop));
        });
    }
    for _ in 0..4 {
        let loaded = rx.recv_timeout(T).expect("a loading thread hung");
        assert!(loaded.is_ok(), "loading failed: {loaded:?}");
    }
    let stats = env.cache_stats();
    assert_eq!(stats.compiled, 1, "{stats:?}");
    assert_eq!(stats.memory_hits, 3, "{stats:?}");
    let names: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains(".tmp")),
        "temporary files left behind: {names:?}"
    );
}

/// An environment links each module once and reuses that for every new
/// instance; two modules instantiated turn about each get their own code.
#[test]
fn modules_instantiated_turn_about_each_run_their_own_code() {
    use antnest_proto::Limits;
    use antnest_proto::ModuleHash;
    use antnest_sandbox::{Sandbox, TaskRunner};

    let env = Sandbox::new(None).unwrap();
    let load = |name: &str| {
        let bytes = std::fs::read(artifact(name)).unwrap();
        env.component(&ModuleHash::of(&bytes), || Some(bytes.clone()))
            .unwrap()
    };
    let (primes, faulty) = (load("primes"), load("faulty"));
    for _ in 0..3 {
        // A fresh runner each time: every one instantiates anew.
        let mut p = TaskRunner::new(env.clone(), primes.clone(), Limits::default());
        let mut f = TaskRunner::new(env.clone(), faulty.clone(), Limits::default());
        assert_eq!(p.process(b"30").unwrap(), b"10", "primes below 30");
        assert_eq!(f.process(b"a").unwrap(), b"A", "faulty upper-cases");
    }
}

/// The epoch ticker sleeps while no guest code runs. A taskunit that starts
/// after a quiet spell has to wake it, or an endless loop would never be
/// stopped.
#[test]
fn an_endless_loop_after_a_quiet_spell_still_times_out() {
    use antnest_proto::TaskError;

    let limit = Duration::from_millis(300);
    let [mut runner] = faulty_runners([limit]);
    assert_eq!(runner.process(b"a").unwrap(), b"A");
    // Far longer than the few idle ticks after which the ticker sleeps.
    std::thread::sleep(Duration::from_millis(500));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(runner.process(b"loop")));
    // Stopped about when its 300 ms are up: without the wake-up the ticker
    // would sleep on for its idle check (10 s). The bound is loose, for a
    // busy machine.
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the endless loop was not stopped in time");
    assert!(
        matches!(result, Err(TaskError::Timeout(t)) if t == limit),
        "{result:?}"
    );
}

/// The epoch ticks at a pace set by the shortest time limit of the calls
/// running. An endless loop with a long limit has the ticker sleeping long;
/// one with a short limit that starts meanwhile must still be stopped at
/// its limit, and the long one must not be stopped at the short one's.
#[test]
fn endless_loops_with_different_limits_each_stop_at_their_own() {
    use antnest_proto::TaskError;
    use std::time::Instant;

    let run = |mut runner: antnest_sandbox::TaskRunner| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = runner.process(b"loop");
            let _ = tx.send((result, started.elapsed()));
        });
        rx
    };
    let (long, short) = (Duration::from_secs(4), Duration::from_millis(300));
    let [long_runner, short_runner] = faulty_runners([long, short]);
    let long_rx = run(long_runner);
    std::thread::sleep(Duration::from_millis(200));
    let short_rx = run(short_runner);
    // Bounds loose for a busy machine; what they catch is a short loop
    // stopped only with the long one, or a long loop cut short.
    for (rx, limit, within) in [(short_rx, short, 3), (long_rx, long, 20)] {
        let (result, took) = rx
            .recv_timeout(Duration::from_secs(within))
            .unwrap_or_else(|_| panic!("the {limit:?} loop ran on past its limit"));
        assert!(
            matches!(result, Err(TaskError::Timeout(t)) if t == limit),
            "{result:?}"
        );
        assert!(took >= limit, "the {limit:?} loop stopped early: {took:?}");
    }
}

/// Runners of the `faulty` job in one in-process environment (so one epoch
/// ticker), one per time limit.
fn faulty_runners<const N: usize>(limits: [Duration; N]) -> [antnest_sandbox::TaskRunner; N] {
    let (env, component) = faulty_module();
    limits.map(|time| {
        let limits = antnest_proto::Limits {
            time,
            ..antnest_proto::Limits::default()
        };
        antnest_sandbox::TaskRunner::new(env.clone(), component.clone(), limits)
    })
}

/// The `faulty` job compiled in an in-process environment of its own.
fn faulty_module() -> (antnest_sandbox::Sandbox, antnest_sandbox::Module) {
    let bytes = std::fs::read(artifact("faulty")).expect("faulty.wasm");
    let env = antnest_sandbox::Sandbox::new(None).unwrap();
    let component = env
        .component(&antnest_proto::ModuleHash::of(&bytes), || {
            Some(bytes.clone())
        })
        .unwrap();
    (env, component)
}

/// The peer's memory budget (`--max-memory`) holds across instances: while
/// one instance holds 48 MiB, another cannot grow as far under an 80 MiB
/// budget and its taskunit fails as "worker busy" (not as the job's own
/// out-of-memory); once the first is dropped the second runs, and every
/// byte taken is given back when the instances go.
#[test]
fn instances_share_the_peers_memory_budget() {
    use antnest_proto::{Limits, TaskError};
    use antnest_sandbox::TaskRunner;

    let (env, module) = faulty_module();
    env.set_max_memory(80 << 20);
    let mut first = TaskRunner::new(env.clone(), module.clone(), Limits::default());
    let mut second = TaskRunner::new(env.clone(), module, Limits::default());
    assert_eq!(first.process(b"grow").unwrap(), b"GREW");
    let held = env.memory_used();
    assert!(
        held >= 48 << 20,
        "the first instance holds its memory: {held}"
    );
    match second.process(b"grow") {
        Err(TaskError::Busy(why)) => assert!(why.contains("--max-memory"), "{why}"),
        other => panic!("the second instance grew past the budget: {other:?}"),
    }
    assert_eq!(
        env.memory_used(),
        held,
        "the failed instance gave back what it took"
    );
    drop(first);
    assert_eq!(env.memory_used(), 0);
    assert_eq!(second.process(b"grow").unwrap(), b"GREW");
    drop(second);
    assert_eq!(env.memory_used(), 0);
}

/// Modules that carry job files (antnest's Python runner with a job
/// appended) share one compiled component: a second job over the same code
/// compiles nothing, each keeps its own files, and a peer's cache gives
/// back each module's exact bytes (kept as the code once plus the files).
#[test]
fn job_files_ride_on_one_compiled_component() {
    use antnest_proto::ModuleHash;
    use antnest_sandbox::Sandbox;
    use antnest_sandbox::job_files::{self, Bundle};

    let dir = scratch();
    let env = Sandbox::new(Some(dir.path().join("cache"))).unwrap();
    let code = std::fs::read(artifact("primes")).unwrap();
    let job = |text: &str| {
        let mut b = Bundle::new("job");
        b.file("job.py", "job.py", text.as_bytes());
        job_files::append(&code, &b)
    };
    let (one, two) = (job("one"), job("two"));
    for bytes in [&one, &two] {
        let hash = ModuleHash::of(bytes);
        env.component(&hash, || Some(bytes.clone())).unwrap();
        assert_eq!(env.stored_module(&hash).as_ref(), Some(bytes));
    }
    assert_eq!(env.cache_stats().compiled, 1, "the code compiled once");
    // From disk, as after a restart: still no compile.
    let env = Sandbox::new(Some(dir.path().join("cache"))).unwrap();
    let mut runner = antnest_sandbox::TaskRunner::new(
        env.clone(),
        env.component(&ModuleHash::of(&two), || None).unwrap(),
        antnest_proto::Limits::default(),
    );
    assert_eq!(runner.process(b"30").unwrap(), b"10");
    assert_eq!(env.cache_stats().compiled, 0);
    // A module whose bytes do not match its hash is refused as before.
    let mut torn = two.clone();
    torn.truncate(torn.len() - 1);
    assert!(
        env.component(&ModuleHash::of(&two[..10]), || Some(torn))
            .is_err()
    );
}

/// A taskunit blocked in a WASI call (Python's `time.sleep`) is stopped at
/// its deadline like one that computes; the others finish. (Were the
/// sleep not cut, the hour it asks for would outlast the test's timeout.)
#[test]
fn a_sleeping_taskunit_is_stopped_at_its_deadline() {
    let dir = scratch();
    let job = dir.path().join("sleepy.py");
    std::fs::write(
        &job,
        "import time\n\ndef processor(x):\n    if x == 'sleep':\n        time.sleep(3600)\n    return x.upper()\n",
    )
    .unwrap();
    let out = submit_local(
        &job,
        &["--task-timeout", "2s", "--attempts", "1", "--keep-going"],
        b"a\nsleep\nb\n",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(text(&out.stdout), "A\nB", "{stderr}");
    assert!(
        stderr.contains("taskunit 1") && stderr.contains("timed out"),
        "{stderr}"
    );
}

/// A cached module damaged on disk is not used or served: it is removed,
/// so the peer fetches it again, and a good copy is kept anew.
#[test]
fn a_damaged_cached_module_is_dropped_and_kept_again() {
    use antnest_proto::ModuleHash;
    use antnest_sandbox::Sandbox;

    let dir = scratch();
    let cache = dir.path().join("cache");
    let bytes = std::fs::read(artifact("primes")).unwrap();
    let hash = ModuleHash::of(&bytes);
    let env = Sandbox::new(Some(cache.clone())).unwrap();
    env.store_module(&hash, &bytes).unwrap();
    let file = cache.join(format!("{hash}.wasm"));
    let mut torn = bytes.clone();
    torn.truncate(bytes.len() / 2);
    std::fs::write(&file, &torn).unwrap();
    assert_eq!(
        env.stored_module(&hash),
        None,
        "a torn copy is not given out"
    );
    assert!(!file.exists(), "the torn copy is removed");
    env.store_module(&hash, &bytes).unwrap();
    assert_eq!(env.stored_module(&hash), Some(bytes));
}

/// The disk cache keeps to its bound (`--cache-max-mb`): past it the least
/// recently used module's files go (one just used stays), and a module
/// whose files went compiles again when it is needed.
#[test]
fn the_module_cache_keeps_to_its_bound() {
    use antnest_proto::ModuleHash;
    use antnest_sandbox::Sandbox;

    let dir = scratch();
    let modules: Vec<Vec<u8>> = ["faulty", "primes", "reverse_strings"]
        .iter()
        .map(|n| std::fs::read(artifact(n)).unwrap())
        .collect();
    let load = |env: &Sandbox, m: &[u8]| {
        let bytes = m.to_vec();
        env.component(&ModuleHash::of(m), move || Some(bytes))
            .unwrap();
    };
    let size = |d: &Path| -> u64 {
        std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    };
    // What each module takes on disk, each in a cache of its own.
    let footprint: Vec<u64> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let d = dir.path().join(format!("alone{i}"));
            load(&Sandbox::new(Some(d.clone())).unwrap(), m);
            size(&d)
        })
        .collect();
    // Room for module 0 with either other module, never for all three.
    let bound = (footprint[0] + footprint[1]).max(footprint[0] + footprint[2]);
    let cache = dir.path().join("cache");
    let fresh = || {
        let env = Sandbox::new(Some(cache.clone())).unwrap();
        env.set_cache_max(bound);
        env
    };
    let env = fresh();
    load(&env, &modules[0]);
    load(&env, &modules[1]);
    assert_eq!(size(&cache), footprint[0] + footprint[1], "both fit");
    // A restarted peer uses module 0 (from disk), then needs module 2.
    let env = fresh();
    load(&env, &modules[0]);
    assert_eq!(env.cache_stats().disk_hits, 1);
    load(&env, &modules[2]);
    assert!(size(&cache) <= bound, "{} > {bound}", size(&cache));
    let env = fresh();
    load(&env, &modules[0]);
    load(&env, &modules[2]);
    assert_eq!(
        (env.cache_stats().disk_hits, env.cache_stats().compiled),
        (2, 0),
        "the recently used modules stayed"
    );
    load(&env, &modules[1]);
    assert_eq!(
        env.cache_stats().compiled,
        1,
        "the least recently used module went, and compiles again"
    );
    assert!(size(&cache) <= bound, "{} > {bound}", size(&cache));
}

/// A compile runs in a child process (`antnest compile-module`), bounded:
/// past its time it is stopped, past its memory it fails, each with a
/// clear error and nothing cached; within its bounds the component it
/// makes loads and runs here.
#[test]
fn a_compile_is_bounded_in_time_and_memory() {
    use antnest_proto::{Limits, ModuleHash};
    use antnest_sandbox::{Compiler, Sandbox, TaskRunner};

    let bytes = std::fs::read(artifact("primes")).unwrap();
    let hash = ModuleHash::of(&bytes);
    let compiler = |time: Duration, memory_mb: u64| Compiler {
        program: env!("CARGO_BIN_EXE_antnest").into(),
        args: vec!["compile-module".into()],
        time,
        memory: memory_mb << 20,
    };
    let dir = scratch();
    let env = Sandbox::new(Some(dir.path().join("cache"))).unwrap();
    let try_with = |c: Compiler| {
        env.compile_in_child(c);
        let bytes = bytes.clone();
        env.component(&hash, move || Some(bytes)).map(|_| ())
    };
    let slow = try_with(compiler(Duration::from_millis(1), 4096)).unwrap_err();
    assert!(slow.to_string().contains("took longer than"), "{slow}");
    let big = try_with(compiler(Duration::from_secs(120), COMPILE_TOO_LITTLE_MB)).unwrap_err();
    assert!(big.to_string().contains("MiB"), "{big}");
    assert!(
        !env.is_compiled(&hash),
        "nothing cached from a failed compile"
    );
    assert_eq!(env.cache_stats().compiled, 0);
    env.compile_in_child(compiler(Duration::from_secs(120), 4096));
    let module = {
        let bytes = bytes.clone();
        env.component(&hash, move || Some(bytes)).unwrap()
    };
    assert_eq!(env.cache_stats().compiled, 1);
    let mut runner = TaskRunner::new(env.clone(), module, Limits::default());
    assert_eq!(runner.process(b"100").unwrap(), b"25");
}

/// Address space too small for a compile of `primes` (but enough to start
/// the program).
const COMPILE_TOO_LITTLE_MB: u64 = 48;

/// A NaN has the same bits on every peer (wasm's canonical NaN), not the
/// CPU's own (x86 makes 0.0 / 0.0 negative), so a taskunit that makes one
/// gives the same bytes wherever it runs.
#[test]
fn a_nan_has_the_same_bits_on_every_peer() {
    let [mut runner] = faulty_runners([Duration::from_secs(10)]);
    assert_eq!(runner.process(b"nan").unwrap(), b"7ff8000000000000");
}

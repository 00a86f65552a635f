//! The native Python runtime: Python taskunits in the worker's own CPython,
//! contained by bubblewrap, with the same results as in wasm.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(600);
const NATIVE: [&str; 3] = ["--allow-native-python", "--runtime", "native"];

/// Why bubblewrap cannot make a sandbox on this machine, if it cannot (the
/// tests that need one say so and skip).
fn no_sandbox_here() -> Option<String> {
    let out = std::process::Command::new("bwrap")
        .args(["--unshare-all", "--ro-bind", "/", "/", "true"])
        .output();
    let why = match out {
        Err(e) => format!("bwrap: {e}"),
        Ok(o) if !o.status.success() => text(&o.stderr),
        Ok(_) => return None,
    };
    eprintln!("skipped: bubblewrap cannot run here ({why})");
    Some(why)
}

fn with(args: &[&str], more: &[&str]) -> Vec<String> {
    args.iter().chain(more).map(|s| s.to_string()).collect()
}

fn submit_with(job: &Path, args: &[String], stdin: &[u8]) -> std::process::Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    submit_local(job, &args, stdin)
}

/// A job of Python values (a dict with a Counter, a class of the job's own,
/// bytes) and an original-style job (`self.taskunits`) give the same
/// output natively as in wasm, and the stats say which runtime ran them.
#[test]
fn a_python_job_gives_the_same_results_natively_and_in_wasm() {
    if no_sandbox_here().is_some() {
        return;
    }
    let dir = scratch();
    let job = dir.path().join("tally.py");
    std::fs::write(
        &job,
        r#"from collections import Counter

class Weight:
    def __init__(self, n):
        self.n = n

def processor(line):
    words = line.split()
    return {"counts": Counter(words), "w": Weight(len(words)), "b": b"\x80!"}

def combine(results):
    total = Counter()
    for r in results:
        total.update(r["counts"])
    return f"{sorted(total.items())} {sum(r['w'].n for r in results)} {results[0]['b']!r}"
"#,
    )
    .unwrap();
    let input = b"a bb a\nccc bb\nz\n";
    let stats = dir.path().join("s.json");
    let stats_arg = ["--stats-json", stats.to_str().unwrap()];
    let wasm = submit_with(&job, &with(&stats_arg, &["--runtime", "wasm"]), input);
    assert!(wasm.status.success(), "{}", text(&wasm.stderr));
    assert_eq!(stats_of(&stats)["native_tasks"], 0);
    assert_eq!(stats_of(&stats)["combined_natively"], false);
    let native = submit_with(&job, &with(&stats_arg, &NATIVE), input);
    assert!(native.status.success(), "{}", text(&native.stderr));
    assert_eq!(text(&native.stdout), text(&wasm.stdout));
    assert_eq!(
        text(&native.stdout),
        "[('a', 2), ('bb', 2), ('ccc', 1), ('z', 1)] 6 b'\\x80!'"
    );
    assert_eq!(stats_of(&stats)["native_tasks"], 3);
    // Small results: combined in wasm, which can.
    assert_eq!(stats_of(&stats)["combined_natively"], false);

    // Where the combine ran shows in what it sees: big results (over a
    // MiB in all) are combined natively where the taskunits ran natively.
    // The job's name is a module the wasm runner has imported already: the
    // job's own wins.
    let platform = dir.path().join("platform.py");
    std::fs::write(
        &platform,
        "import sys\n\ndef processor(x):\n    return x * 700_000\n\n\
         def combine(results):\n    return f\"{len(results)} on {sys.platform}\"\n",
    )
    .unwrap();
    for (runtime, want) in [("wasm", "2 on wasi"), ("native", "2 on linux")] {
        let args = ["--allow-native-python", "--runtime", runtime];
        let out = submit_with(&platform, &with(&stats_arg, &args), b"a\nb\n");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), want, "{runtime}");
        let native = runtime == "native";
        assert_eq!(stats_of(&stats)["combined_natively"], native, "{runtime}");
    }
    // A native combine that fails says where, as in wasm.
    let broken = dir.path().join("broken.py");
    std::fs::write(
        &broken,
        "def processor(x):\n    return x\n\ndef combine(results):\n    raise ValueError(\"no sum\")\n",
    )
    .unwrap();
    let out = submit_with(&broken, &with(&NATIVE, &[]), b"a\n");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("combine failed")
            && err.contains("ValueError: no sum")
            && err.contains("broken.py"),
        "{err}"
    );

    let original = Path::new("jobs/original/reverse_strings.py");
    let out = submit_with(original, &with(&stats_arg, &NATIVE), b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "olleh\ndlrow\n");
    assert_eq!(stats_of(&stats)["native_tasks"], 2);
}

/// A native taskunit has no network, cannot write the worker's files,
/// has a /tmp of its own and does not see the peer's cache.
#[test]
fn native_python_is_contained() {
    if no_sandbox_here().is_some() {
        return;
    }
    let dir = scratch();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = dir.path().join("written-by-the-job");
    let host_tmp = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    let job = dir.path().join("probe.py");
    std::fs::write(
        &job,
        format!(
            r#"import os, socket

def processor(what):
    try:
        if what == "net":
            socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
            return "net open"
        if what == "write":
            with open({target:?}, "w") as f:
                f.write("x")
            return "write done"
        if what == "tmp":
            with open("/tmp/antnest-native-probe", "w") as f:
                f.write("x")
            seen = os.path.exists({host_tmp:?})
            return f"tmp private {{not seen}}"
        if what == "cache":
            listed = os.listdir({cache:?})
            return f"cache {{listed}}"
    except OSError as e:
        return f"{{what}} refused"
"#,
            target = target.display().to_string(),
            host_tmp = host_tmp.path().display().to_string(),
            cache = cache_dir().display().to_string(),
        ),
    )
    .unwrap();
    let out = submit_with(&job, &with(&NATIVE, &[]), b"net\nwrite\ntmp\ncache\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "net refused\nwrite refused\ntmp private True\ncache []"
    );
    assert!(!target.exists(), "the job wrote the worker's file");
    assert!(
        listener.accept().is_err(),
        "the job reached a loopback port"
    );
}

/// A native taskunit that sleeps past its time, grows past its memory or
/// returns more than the output limit fails with that reason, and the
/// next taskunit runs in a fresh process.
#[test]
fn native_taskunits_are_limited_and_the_process_recovers() {
    if no_sandbox_here().is_some() {
        return;
    }
    let dir = scratch();
    let job = dir.path().join("greedy.py");
    std::fs::write(
        &job,
        r#"import time

def processor(what):
    if what == "sleep":
        time.sleep(60)
    if what == "memory":
        return len(bytearray(4 << 30))
    if what == "output":
        return "x" * (3 << 20)
    return f"{what} fine"
"#,
    )
    .unwrap();
    let limits = [
        "--keep-going",
        "--attempts",
        "1",
        "--task-timeout",
        "2s",
        "--memory-mb",
        "64",
        "--max-output-mb",
        "1",
    ];
    let out = submit_with(
        &job,
        &with(&NATIVE, &limits),
        b"sleep\nafter-sleep\nmemory\nafter-memory\noutput\nafter-output\n",
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        text(&out.stdout),
        "after-sleep fine\nafter-memory fine\nafter-output fine"
    );
    assert!(err.contains("taskunit 0 failed: timed out"), "{err}");
    assert!(err.contains("taskunit 2 failed: out of memory"), "{err}");
    assert!(err.contains("taskunit 4 failed: output too large"), "{err}");

    // Quick taskunits sent ahead of and after a sleeping one (several are
    // in the process at once, their answers written out together): only
    // the sleeping one fails.
    let out = submit_with(&job, &with(&NATIVE, &limits), b"a\nb\nc\nsleep\nd\ne\n");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(text(&out.stdout), "a fine\nb fine\nc fine\nd fine\ne fine");
    assert!(err.contains("taskunit 3 failed: timed out"), "{err}");
    assert_eq!(err.matches("failed:").count(), 1, "{err}");
}

/// On a mesh, a job for native Python runs only on the peer that allows it,
/// and a peer allows other masters' jobs only when it trusts them.
#[test]
fn native_python_on_a_mesh_runs_only_where_allowed_and_trusted() {
    if no_sandbox_here().is_some() {
        return;
    }
    let dir = scratch();
    let untrusted = run(
        &["peer", "--no-mdns", "--allow-native-python"],
        b"",
        Duration::from_secs(60),
    );
    assert!(!untrusted.status.success());
    assert!(
        text(&untrusted.stderr).contains("needs --mesh-key or --allow-master"),
        "{}",
        text(&untrusted.stderr)
    );
    let key = write_key(dir.path(), "mesh.key", 3);
    let native = PeerProc::loopback(
        dir.path(),
        "native",
        &["--mesh-key", &key, "--allow-native-python"],
    );
    let plain = PeerProc::loopback(
        dir.path(),
        "plain",
        &["--mesh-key", &key, "--bootstrap", native.addr()],
    );
    let stats = dir.path().join("s.json");
    let input: String = (0..40).map(|i| format!("line {i}\n")).collect();
    let out = plain.submit(
        Path::new("jobs/reverse_strings.py"),
        &[
            "--runtime",
            "native",
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        input.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want: Vec<String> = (0..40)
        .map(|i| format!("line {i}").chars().rev().collect())
        .collect();
    assert_eq!(text(&out.stdout), want.join("\n"));
    let s = stats_of(&stats);
    assert_eq!(s["native_tasks"], 40, "{s}");
    let per_peer = s["per_peer"].as_object().unwrap();
    assert_eq!(per_peer.len(), 1, "{s}");
    assert_eq!(per_peer[&native.peer_id], 40, "{s}");
}

/// Clear refusals: no bubblewrap, and native runtime for a job that is not
/// Python.
#[test]
fn native_python_refuses_clearly() {
    let dir = scratch();
    // A PATH with Python on it and no bubblewrap.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let python = which("python3").expect("python3 on PATH");
    std::os::unix::fs::symlink(python, bin.join("python3")).unwrap();
    let mut cmd = antnest();
    cmd.env("PATH", &bin).arg("submit").args(LOCAL).args(NATIVE);
    cmd.arg("jobs/reverse_strings.py");
    let out = run_cmd(&mut cmd, b"a\n", T);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("needs bubblewrap"),
        "{}",
        text(&out.stderr)
    );
    let out = submit_local(
        Path::new("jobs/reverse_strings"),
        &["--runtime", "native"],
        b"a\n",
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--runtime native is for Python jobs"),
        "{}",
        text(&out.stderr)
    );
}

/// The numpy sample runs natively where numpy is installed.
#[test]
fn the_numpy_sample_runs_natively() {
    if no_sandbox_here().is_some() {
        return;
    }
    let has_numpy = std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_numpy {
        eprintln!("skipped: numpy is not installed for python3 (tests/setup.sh installs it)");
        return;
    }
    let dir = scratch();
    let stats = dir.path().join("s.json");
    let args = with(&NATIVE, &["--stats-json", stats.to_str().unwrap()]);
    let out = submit_with(
        Path::new("jobs/numpy_norms.py"),
        &args,
        b"3 4\n6 8\n0 0 5\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "3 vectors, total norm 20.000000");
    // Its results are small, so wasm tried first, and could not import it.
    assert_eq!(stats_of(&stats)["combined_natively"], true);

    // A split of its own that needs numpy runs natively too (wasm cannot
    // import the job), and reads the input through the host.
    let job = dir.path().join("pairs.py");
    std::fs::write(
        &job,
        "import numpy as np\n\ndef split(data):\n    \
         for row in np.arange(int(data)).reshape(-1, 2):\n        yield row.tolist()\n\n\
         def processor(pair):\n    return int(np.prod(pair))\n\n\
         def combine(products):\n    return str(sum(products))\n",
    )
    .unwrap();
    let out = submit_local(&job, &NATIVE, b"6");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "26", "0*1 + 2*3 + 4*5");
    // In wasm it cannot be imported, and says why.
    let out = submit_local(&job, &["--runtime", "wasm"], b"6");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("split failed") && err.contains("numpy"),
        "{err}"
    );
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A job that imports in wasm but not natively fails each taskunit with
/// the import's traceback, naming the job's file and line.
#[test]
fn a_job_that_cannot_be_imported_natively_says_why() {
    if no_sandbox_here().is_some() {
        return;
    }
    let dir = scratch();
    let job = dir.path().join("onlywasm.py");
    std::fs::write(
        &job,
        "import sys\nif sys.platform != \"wasi\":\n    raise RuntimeError(\"only in wasm\")\n\n\
         def processor(x):\n    return x\n",
    )
    .unwrap();
    let out = submit_with(&job, &with(&NATIVE, &["--attempts", "1"]), b"a\nb\n");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("taskunit 1 failed: job error: cannot load the job")
            && err.contains(&format!("File \"{}\", line 3", job.display()))
            && err.contains("RuntimeError: only in wasm"),
        "{err}"
    );
}

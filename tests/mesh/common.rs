//! Fixtures: job artifacts (built once), the antnest binary run with a
//! timeout, and peer processes that are killed when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub(crate) const JOBS: &[&str] = &[
    "reverse_strings",
    "wordcount",
    "primes",
    "mandelbrot",
    "faulty",
];

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Jobs are built into their own target dir so a nested cargo never waits
/// on the lock held by the `cargo test` that runs us.
pub(crate) fn jobs_target() -> PathBuf {
    repo().join("target/jobs")
}

/// Module and artifact cache shared by the tests (built Python jobs are slow to make).
pub(crate) fn cache_dir() -> PathBuf {
    repo().join("target/test-cache")
}

/// The component for a job in `jobs/`, built once per test run.
pub(crate) fn artifact(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    assert!(JOBS.contains(&name), "unknown job {name}");
    BUILT.get_or_init(|| {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--release", "--target", "wasm32-wasip2"]);
        for j in JOBS {
            cmd.args(["-p", j]);
        }
        let status = cmd
            .current_dir(repo())
            .env("CARGO_TARGET_DIR", jobs_target())
            .status()
            .expect("run cargo");
        assert!(status.success(), "building the sample jobs failed");
    });
    jobs_target().join(format!("wasm32-wasip2/release/{name}.wasm"))
}

pub(crate) fn antnest() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_antnest"));
    cmd.env("ANTNEST_CACHE", cache_dir())
        .env("CARGO_TARGET_DIR", jobs_target())
        .env_remove("ANTNEST_CONTROL")
        .env(
            "RUST_LOG",
            // ANTNEST_TEST_LOG turns the peers' logs up when a test is
            // being investigated.
            std::env::var("ANTNEST_TEST_LOG").unwrap_or_else(|_| "warn,libp2p_kad=error".into()),
        );
    cmd
}

/// Wait for a child, killing it (and failing) after `timeout`.
pub(crate) fn wait_output(mut child: Child, timeout: Duration) -> Output {
    // Drain both pipes while waiting, so a big output cannot block the child.
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "timed out after {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Run `antnest ARGS` with `stdin`, under a timeout.
pub(crate) fn run(args: &[&str], stdin: &[u8], timeout: Duration) -> Output {
    run_cmd(antnest().args(args), stdin, timeout)
}

pub(crate) fn run_cmd(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Output {
    let _counted = Counted::process();
    let (child, writer) = spawn_fed(cmd, stdin);
    let out = wait_output(child, timeout);
    let _ = writer.join();
    out
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Spawn `cmd` with piped stdio; a thread feeds it `stdin`.
fn spawn_fed(cmd: &mut Command, stdin: &[u8]) -> (Child, std::thread::JoinHandle<()>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn antnest");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    (child, writer)
}

/// A unique scratch directory, removed on drop.
pub(crate) fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("antnest-test")
        .tempdir()
        .unwrap()
}

pub(crate) fn stats_of(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("stats json written")).expect("stats json")
}

/// Tests run in parallel. Each antnest process a test starts (a peer, a
/// submit, a local run) counts itself in here while it lives; a test that
/// times peers against each other runs [`alone`]: it waits until no other
/// test's process is alive, and new ones wait for it.
/// (A test may start a process while holding others, so a process never
/// waits for a test merely waiting to run alone: that could wait for ever.)
static MACHINE: (std::sync::Mutex<(usize, bool)>, std::sync::Condvar) =
    (std::sync::Mutex::new((0, false)), std::sync::Condvar::new());

thread_local! {
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn machine() -> std::sync::MutexGuard<'static, (usize, bool)> {
    MACHINE.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `f` with no other test's antnest processes alive (they wait to start).
pub(crate) fn alone<R>(f: impl FnOnce() -> R) -> R {
    {
        let mut m = machine();
        while m.0 > 0 || m.1 {
            m = MACHINE.1.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        m.1 = true;
    }
    ALONE.with(|a| a.set(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    ALONE.with(|a| a.set(false));
    machine().1 = false;
    MACHINE.1.notify_all();
    out.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// An antnest process of a test, counted in [`MACHINE`] until dropped (not
/// counted inside the test that runs [`alone`]).
struct Counted(bool);

impl Counted {
    /// Count a process in, waiting while a test runs [`alone`].
    fn process() -> Counted {
        if ALONE.with(|a| a.get()) {
            return Counted(false);
        }
        let mut m = machine();
        while m.1 {
            m = MACHINE.1.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        m.0 += 1;
        Counted(true)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0 {
            machine().0 -= 1;
            MACHINE.1.notify_all();
        }
    }
}

/// An `antnest peer` process; killed on drop.
pub(crate) struct PeerProc {
    _counted: Counted,
    pub(crate) child: Child,
    pub(crate) peer_id: String,
    /// Listen addresses with the /p2p/ suffix.
    pub(crate) addrs: Vec<String>,
    pub(crate) control: PathBuf,
    /// The web UI's base URL, with `--ui`.
    pub(crate) ui: Option<String>,
}

impl PeerProc {
    /// Start `antnest peer` with a private control socket in `dir`.
    pub(crate) fn start(dir: &Path, name: &str, extra: &[&str]) -> PeerProc {
        Self::start_with(antnest(), dir, name, extra)
    }

    /// Start with a prepared command (e.g. `ip netns exec NS antnest`).
    pub(crate) fn start_with(mut cmd: Command, dir: &Path, name: &str, extra: &[&str]) -> PeerProc {
        let counted = Counted::process();
        let control = dir.join(format!("{name}.sock"));
        let mut child = cmd
            .arg("peer")
            .arg("--control")
            .arg(&control)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn peer");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut seen = Vec::new();
            while let Some(Ok(line)) = lines.next() {
                let done = line.starts_with("control socket:");
                seen.push(line);
                if done {
                    let _ = tx.send(std::mem::take(&mut seen));
                }
            }
        });
        let lines = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("peer {name} did not start"));
        let peer_id = lines
            .iter()
            .find_map(|l| l.strip_prefix("peer id: "))
            .expect("peer id line")
            .to_string();
        let addrs = lines
            .iter()
            .filter_map(|l| l.strip_prefix("listening on: "))
            .map(str::to_string)
            .collect();
        let ui = lines
            .iter()
            .find_map(|l| l.strip_prefix("ui: "))
            .map(str::to_string);
        PeerProc {
            _counted: counted,
            child,
            peer_id,
            addrs,
            control,
            ui,
        }
    }

    /// A one-slot peer on loopback without mDNS, plus `extra` flags.
    pub(crate) fn loopback(dir: &Path, name: &str, extra: &[&str]) -> PeerProc {
        let mut args = LOOPBACK_PEER.to_vec();
        args.extend_from_slice(extra);
        Self::start(dir, name, &args)
    }

    /// A one-slot loopback worker of `master` with a module cache of its
    /// own (`DIR/NAME-cache`, which may hold files already), plus `extra`
    /// flags: it fetches and compiles what it runs itself. The cache's path.
    pub(crate) fn own_cache_worker(
        dir: &Path,
        name: &str,
        master: &PeerProc,
        extra: &[&str],
    ) -> (PeerProc, PathBuf) {
        let cache = dir.join(format!("{name}-cache"));
        let mut args = vec![
            "--bootstrap",
            master.addr(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        (Self::loopback(dir, name, &args), cache)
    }

    /// `antnest submit --control <this peer> JOB EXTRA..` with `stdin`.
    pub(crate) fn submit(&self, job: &Path, extra: &[&str], stdin: &[u8]) -> Output {
        run(
            &self.submit_args(job, extra),
            stdin,
            Duration::from_secs(600),
        )
    }

    /// The same submission, left running in the background.
    pub(crate) fn spawn_submit(&self, job: &Path, extra: &[&str], stdin: &[u8]) -> Background {
        spawn_antnest(&self.submit_args(job, extra), stdin)
    }

    fn submit_args<'a>(&'a self, job: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "submit",
            "--control",
            self.control.to_str().unwrap(),
            job.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addrs[0]
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A mesh key file `name` in `dir` (its 32 bytes start at `byte`); its path.
pub(crate) fn write_key(dir: &std::path::Path, name: &str, byte: u8) -> String {
    let path = dir.join(name);
    let hex: String = (0..32)
        .map(|i| format!("{:02x}", byte.wrapping_add(i)))
        .collect();
    std::fs::write(&path, format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

/// Poll `check` until it holds or `timeout` passes.
pub(crate) fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    eventually_or(timeout, what, || {
        if check() { Ok(()) } else { Err("no".into()) }
    });
}

/// Poll `check` until it returns `Ok` or `timeout` passes; the panic shows
/// what the last `Err` said.
pub(crate) fn eventually_or(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last seen: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number of primes below each of `ns`, by a sieve (an independent
/// method from the job's trial division, and fast in a debug build).
/// `count` lines of numbers from `base` on (the `primes` job's input), and
/// the sum of the primes' counts the job gives for them.
pub(crate) fn primes_input(count: u64, base: u64) -> (String, u64) {
    let ns: Vec<u64> = (0..count).map(|i| base + i).collect();
    let input = ns.iter().map(|n| format!("{n}\n")).collect();
    (input, count_primes_below(&ns).iter().sum())
}

pub(crate) fn count_primes_below(ns: &[u64]) -> Vec<u64> {
    let max = ns.iter().copied().max().unwrap_or(0) as usize;
    let mut composite = vec![false; max.max(2)];
    let mut below = vec![0u64; max + 1];
    for k in 2..max {
        if !composite[k] {
            let mut m = k * k;
            while m < max {
                composite[m] = true;
                m += k;
            }
        }
    }
    for k in 1..=max {
        below[k] = below[k - 1] + u64::from(k > 2 && !composite[k - 1]);
    }
    ns.iter().map(|&n| below[n as usize]).collect()
}

/// A one-slot peer listening on loopback only, without mDNS.
pub(crate) const LOOPBACK_PEER: [&str; 5] = [
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--no-mdns",
    "--slots",
    "1",
];

/// Flags that make `submit` run its own loopback-only peer.
pub(crate) const LOCAL: [&str; 4] = [
    "--standalone",
    "--no-mdns",
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
];

/// `antnest submit LOCAL.. JOB EXTRA..` with `stdin`, under a timeout.
pub(crate) fn submit_local(job: &Path, extra: &[&str], stdin: &[u8]) -> Output {
    let mut args = vec!["submit"];
    args.extend(LOCAL);
    args.push(job.to_str().unwrap());
    args.extend_from_slice(extra);
    run(&args, stdin, Duration::from_secs(600))
}

/// A command running in the background; its stderr is read line by line.
pub(crate) struct Background {
    _counted: Counted,
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

/// Start `antnest ARGS` in the background, feeding it `stdin`.
pub(crate) fn spawn_antnest(args: &[&str], stdin: &[u8]) -> Background {
    let counted = Counted::process();
    let (mut child, _writer) = spawn_fed(antnest().args(args), stdin);
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Background {
        _counted: counted,
        child: Some(child),
        lines,
        seen: Vec::new(),
    }
}

impl Background {
    /// The id from the "antnest: job ID started" line.
    pub(crate) fn job_id(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no job id printed; stderr: {:?}", self.seen));
            let id = line
                .strip_prefix("antnest: job ")
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string);
            self.seen.push(line);
            if let Some(id) = id {
                return id;
            }
        }
    }

    pub(crate) fn running(&mut self) -> bool {
        let child = self.child.as_mut().expect("not finished");
        child.try_wait().expect("try_wait").is_none()
    }

    /// Wait for the end (killing it after `timeout`); stderr holds every line.
    pub(crate) fn finish(mut self, timeout: Duration) -> Output {
        let mut out = wait_output(self.child.take().expect("not finished"), timeout);
        self.seen.extend(self.lines.try_iter());
        // The reader thread may still hold the last lines for a moment.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        out.stderr = self.seen.join("\n").into_bytes();
        out
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET path` from a peer's web server at `base`; the body.
pub(crate) fn http_get(base: &str, path: &str) -> String {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of one Prometheus sample (`name{labels}`) in `metrics`.
pub(crate) fn metric_value(metrics: &str, sample: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Whether `observer` lists `other` as connected (`antnest peers`).
pub(crate) fn connected(observer: &PeerProc, other: &PeerProc) -> bool {
    let out = run(
        &["peers", "--control", observer.control.to_str().unwrap()],
        b"",
        Duration::from_secs(60),
    );
    text(&out.stdout)
        .lines()
        .any(|l| l.starts_with(&other.peer_id) && l.contains(" connected"))
}

/// Say that a test was not run here, and why.
pub(crate) fn skipped(what: &str, why: &str) {
    eprintln!("SKIPPED: {why}; {what} not run");
}

/// `n` hosts on one bridge (network namespaces) for a test; `None`, said,
/// where namespaces may not be made.
pub(crate) fn lan(n: usize, what: &str) -> Option<crate::bridge::Bridge> {
    match crate::bridge::Bridge::create(n) {
        None => {
            skipped(what, "`ip netns add` is not permitted here (needs root)");
            None
        }
        Some(net) => Some(net.expect("namespaces made but not linked")),
    }
}

/// `antnest` in host `i` of `net`, with the tests' cache and logging.
pub(crate) fn antnest_in(net: &crate::bridge::Bridge, i: usize) -> Command {
    let mut cmd = net.cmd(i, Path::new(env!("CARGO_BIN_EXE_antnest")));
    cmd.env("ANTNEST_CACHE", cache_dir())
        .env("RUST_LOG", "warn,libp2p_kad=error");
    cmd
}

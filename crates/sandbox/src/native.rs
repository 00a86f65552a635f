//! The native Python runtime: a Python job's taskunits run in the
//! worker's own CPython, at native speed and with the worker's installed
//! packages (numpy, say), instead of in the wasm runner. Opt-in on the
//! worker, for masters it trusts (the peer's flags decide whose jobs).
//!
//! Each slot keeps one long-lived CPython process per job, started under
//! bubblewrap: no network, the filesystem read-only, a private `/tmp`,
//! the peer's cache folder hidden, and the process dies with the peer.
//! It is limited like a wasm taskunit: compute time (the host waits for
//! each answer until the taskunit's deadline, then kills the process; the
//! next taskunit gets a fresh one), memory (an address-space limit: a
//! taskunit that passes it gets a `MemoryError`, reported as out of
//! memory), and output (an answer over the limit is not read: the process
//! is killed). The job's code is the same files the wasm runner carries
//! ([`crate::job_files`]) and runs through the same Python
//! (`python/antnest_job.py`), so a job gives the same results in both.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use antnest_proto::limits::MAX_TASKUNIT;
use antnest_proto::{Limits, SharedBytes, TaskError};

use crate::{SplitOutcome, python};

/// Address space a native process gets beyond the job's memory limit: the
/// interpreter and the libraries a job imports (CPython with numpy maps
/// about 140 MB).
const BASE_MEMORY: u64 = 512 << 20;
/// How long a new process may take to start and import its job.
const START_MAX: Duration = Duration::from_secs(60);
/// The most of a taskunit's printed output kept (the process caps it too).
const CAPTURE_MAX: usize = 64 << 10;
/// A taskunit frame this small is written with its length in one write.
const SMALL_FRAME: usize = 16 << 10;
/// Taskunits in a process at once, at most (see
/// [`NativeRunner::process_each`])...
const IN_FLIGHT: usize = 64;
/// ... and their bytes, past which no more are sent before an answer: well
/// under a pipe's 64 KiB, so a write never waits on a process that waits
/// for its answers to be read.
const IN_FLIGHT_BYTES: usize = 16 << 10;
/// What one read from a process's answers asks for at least.
const READ_CHUNK: usize = 64 << 10;
/// The pipes to and from a process, in bytes (Linux's most by default).
const PIPE_SIZE: usize = 1 << 20;
/// The end of a process's own stderr kept, for when it dies.
const STDERR_TAIL: usize = 4 << 10;
/// The frame length that ends a combine's results.
const END: u32 = u32::MAX;
/// An answer's tag: a result, a job error, out of memory (see
/// `antnest_native.py`)...
const OK: u8 = 0;
const ERROR: u8 = 1;
const NO_MEMORY: u8 = 2;
/// ... a split's or combine's answer: the job has none ...
const NOT_HERE: u8 = 3;
/// ... and a split's asks: input (the most bytes wanted), and a taskunit
/// made.
const READ: u8 = 4;
const EMIT: u8 = 5;

/// Why the native runtime cannot be used on this peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NativeError {
    #[error(
        "--allow-native-python needs bubblewrap (`bwrap`) to contain native Python, and it was not found; install it (Debian: apt install bubblewrap)"
    )]
    NoBubblewrap,
    #[error("native Python could not be started in bubblewrap ({python}): {reason}")]
    Broken { python: String, reason: String },
}

/// The worker's CPython and the bubblewrap that contains it, checked to
/// work. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NativePython {
    inner: Arc<Setup>,
}

#[derive(Debug)]
struct Setup {
    bwrap: PathBuf,
    python: String,
    /// Folders hidden from the job (the peer's cache, its keys).
    hidden: Vec<PathBuf>,
}

impl NativePython {
    /// Find bubblewrap, start `python` in it once to see that both work,
    /// and hide `hidden` (folders that exist) from every job.
    pub fn check(python: &str, hidden: Vec<PathBuf>) -> Result<Self, NativeError> {
        let bwrap = find_on_path("bwrap").ok_or(NativeError::NoBubblewrap)?;
        let setup = Setup {
            bwrap,
            python: python.to_owned(),
            hidden: hidden.into_iter().filter(|d| d.is_dir()).collect(),
        };
        let broken = |reason: String| NativeError::Broken {
            python: python.to_owned(),
            reason,
        };
        let out = setup
            .command(&["-c", "import sys; print(sys.version_info[0])"], 1 << 30)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| broken(e.to_string()))?;
        if !out.status.success() || out.stdout.trim_ascii() != b"3" {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(broken(format!("{}; {}", out.status, stderr.trim())));
        }
        Ok(NativePython {
            inner: Arc::new(setup),
        })
    }
}

impl Setup {
    /// `python args…` in a fresh bubblewrap, its address space capped at
    /// `memory` bytes.
    fn command(&self, args: &[&str], memory: u64) -> Command {
        let mut cmd = Command::new(&self.bwrap);
        cmd.args(["--unshare-all", "--die-with-parent", "--new-session"])
            .args(["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"])
            .args(["--tmpfs", "/tmp"]);
        for dir in &self.hidden {
            cmd.arg("--tmpfs").arg(dir);
        }
        cmd.arg("--").arg(&self.python).args(args);
        // One process per slot: numeric libraries use one thread each.
        for var in ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
            cmd.env(var, "1");
        }
        cmd.env("PYTHONDONTWRITEBYTECODE", "1");
        crate::compile::cap_address_space(&mut cmd, memory);
        cmd
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `process` for one Python job in a native process, kept across
/// taskunits.
pub struct NativeRunner {
    python: NativePython,
    files: Arc<[u8]>,
    limits: Limits,
    process: Option<Process>,
    /// Why the job could not be imported: every taskunit's error.
    load_error: Option<String>,
    last_stderr: String,
}

/// One running native process.
struct Process {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// What was read from `stdout` and not taken yet is
    /// `buf[start..end]`: answers are read in chunks, not piece by piece
    /// (one read for a small taskunit's answer), into a buffer that only
    /// grows.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The end of what the process wrote to its own stderr.
    stderr: Arc<Mutex<VecDeque<u8>>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        // bubblewrap's death ends its namespace, and every process in it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a wait for the process ended badly.
enum Stop {
    Deadline,
    /// The answer would be this many bytes, over the output limit.
    TooLarge(usize),
    /// The process ended, or broke the protocol; the reason.
    Died(String),
}

impl NativeRunner {
    /// A runner for the job whose files are `files` (see [`crate::job_files`]).
    pub fn new(python: NativePython, files: Arc<[u8]>, limits: Limits) -> Self {
        NativeRunner {
            python,
            files,
            limits,
            process: None,
            load_error: None,
            last_stderr: String::new(),
        }
    }

    /// What the last taskunit printed (empty if nothing).
    pub fn take_stderr(&mut self) -> String {
        std::mem::take(&mut self.last_stderr)
    }

    /// Process one taskunit.
    pub fn process(&mut self, unit: &[u8]) -> Result<Vec<u8>, TaskError> {
        let mut one = Some((0, unit));
        let mut answer = None;
        self.process_each(&mut || one.take(), &mut |_, r, printed| {
            answer = Some((r, printed))
        });
        let (result, printed) = answer.expect("one taskunit, one answer");
        self.last_stderr = printed;
        result
    }

    /// Process the taskunits `next` hands out (each with a tag of the
    /// caller's), in order, calling `done` with each one's tag, result and
    /// what it printed. Several are in the
    /// process at once (each sent before the answers to those ahead of it
    /// are read), so the process goes from one to the next without
    /// waiting for this thread, and writes its answers out a few at a
    /// time: for small taskunits the round trip, not the work, is most of
    /// the time. Each still has its own deadline, from when the answer
    /// before it came. A process that ends or passes a deadline with
    /// several taskunits in it is replaced, and those run again one at a
    /// time, so that only the one at fault fails.
    pub fn process_each<'u>(
        &mut self,
        next: &mut dyn FnMut() -> Option<(u64, &'u [u8])>,
        done: &mut dyn FnMut(u64, Result<Vec<u8>, TaskError>, String),
    ) {
        // Sent, not answered yet, in order; and sent to a process that
        // ended before answering them, to send again.
        let mut in_flight: VecDeque<(u64, &'u [u8])> = VecDeque::new();
        let mut again: VecDeque<(u64, &'u [u8])> = VecDeque::new();
        // Taskunits to run one at a time, after a process ended with
        // several in it: which one it ended on is not known (the process
        // writes its answers out a few at a time), so each runs again
        // alone, and only the one at fault fails.
        let mut alone = 0;
        let mut busy_since = Instant::now();
        loop {
            if self.process.is_none() && self.load_error.is_none() {
                match self.start() {
                    Ok(p) => self.process = p,
                    Err(e) => {
                        // Nothing can run here: every taskunit gets why.
                        while let Some((tag, _)) = again.pop_front().or_else(&mut *next) {
                            done(tag, Err(e.clone()), String::new());
                        }
                        return;
                    }
                }
            }
            let Some(process) = self.process.as_mut() else {
                let why = self
                    .load_error
                    .clone()
                    .expect("no process: the import failed");
                while let Some((tag, _)) = again.pop_front().or_else(&mut *next) {
                    done(tag, Err(TaskError::Guest(why.clone())), String::new());
                }
                return;
            };
            // Top up what is in the process, within a window small enough
            // that writing never waits on a process blocked writing its
            // answers (a pipe holds 64 KiB).
            let mut sent_bytes: usize = in_flight.iter().map(|(_, u)| u.len() + 4).sum();
            let window = if alone > 0 { 1 } else { IN_FLIGHT };
            while in_flight.len() < window {
                let Some((tag, unit)) = again.pop_front().or_else(&mut *next) else {
                    break;
                };
                if !in_flight.is_empty() && sent_bytes + unit.len() + 4 > IN_FLIGHT_BYTES {
                    // It goes once those ahead of it are answered.
                    again.push_front((tag, unit));
                    break;
                }
                if in_flight.is_empty() {
                    busy_since = Instant::now();
                }
                let sent = process.send(unit, Instant::now() + self.limits.time);
                in_flight.push_back((tag, unit));
                sent_bytes += unit.len() + 4;
                if sent.is_err() {
                    // It ended: its answers so far are read below, and the
                    // one it ended on says why.
                    break;
                }
            }
            if in_flight.is_empty() {
                return;
            }
            let answer = process.answer(busy_since + self.limits.time, self.limits.output);
            busy_since = Instant::now();
            if matches!(answer, Err(Stop::Deadline | Stop::Died(_))) && in_flight.len() > 1 {
                self.process = None;
                while let Some(unit) = in_flight.pop_back() {
                    again.push_front(unit);
                }
                alone = again.len();
                continue;
            }
            alone = alone.saturating_sub(1);
            let (tag, _) = in_flight.pop_front().expect("one in flight at least");
            match answer {
                Ok((OK, payload, printed)) => done(tag, Ok(payload), printed),
                Ok((ERROR, payload, printed)) => done(
                    tag,
                    Err(TaskError::Guest(String::from_utf8_lossy(&payload).into())),
                    printed,
                ),
                Ok((_, _, printed)) => {
                    // A MemoryError may leave the interpreter short of
                    // memory for good: start afresh.
                    self.process = None;
                    done(
                        tag,
                        Err(TaskError::OutOfMemory(self.limits.memory)),
                        printed,
                    );
                }
                Err(stop) => {
                    let tail = process.stderr_tail();
                    self.process = None;
                    done(tag, Err(self.stopped(stop, &tail)), String::new());
                }
            }
            if self.process.is_none() {
                // Those after it were never answered: again, in order.
                while let Some(unit) = in_flight.pop_back() {
                    again.push_front(unit);
                }
            }
        }
    }

    /// The error for a taskunit whose process stopped so.
    fn stopped(&self, stop: Stop, tail: &str) -> TaskError {
        match stop {
            Stop::Deadline => TaskError::Timeout(self.limits.time),
            Stop::TooLarge(size) => TaskError::OutputTooLarge {
                size,
                limit: self.limits.output,
            },
            Stop::Died(why) => TaskError::Trap(format!(
                "the native Python process ended: {why}{}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("\n{tail}")
                }
            )),
        }
    }

    /// Run the job's combine over `results` (in taskunit order, as they
    /// come: the process takes each as it comes and decodes it while the
    /// job runs on). `None` means the job has no combine (the caller
    /// joins the results). The time limit counts from the last result;
    /// the output is held to [`Limits::combined_output`].
    pub fn combine(
        mut self,
        results: impl Iterator<Item = Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, TaskError> {
        let mut process = self.start_once("combine")?;
        let limit = self.limits.combined_output();
        let mut sent = Ok(());
        for result in results {
            // The process only stores what it reads: a write that waits a
            // whole time limit means it is stuck.
            sent = process.send(&result, Instant::now() + self.limits.time);
            if sent.is_err() {
                break; // it ended: its answer (or its end) says why
            }
        }
        if sent.is_ok() {
            let end = Instant::now() + self.limits.time;
            // Results end with a length no frame has.
            let _ = write_until(&mut process.stdin, &END.to_le_bytes(), end);
        }
        match process.answer(Instant::now() + self.limits.time, limit) {
            Ok((OK, output, _)) => Ok(Some(output)),
            Ok((NOT_HERE, _, _)) => Ok(None),
            Ok((ERROR, why, _)) => Err(TaskError::Guest(String::from_utf8_lossy(&why).into())),
            Ok(_) => Err(TaskError::OutOfMemory(self.limits.memory)),
            Err(Stop::TooLarge(size)) => Err(TaskError::OutputTooLarge { size, limit }),
            Err(stop) => Err(self.stopped(stop, &process.stderr_tail())),
        }
    }

    /// Run the job's split over `input`, handing each taskunit to `emit`,
    /// as [`crate::run_split`] does in wasm. The time limit counts the
    /// process's time only: not the waits for input or for `emit` (which
    /// waits while workers are behind).
    pub fn split(
        mut self,
        mut input: impl Read,
        emit: &mut dyn FnMut(SharedBytes) -> Result<(), String>,
    ) -> Result<SplitOutcome, TaskError> {
        let mut process = self.start_once("split")?;
        let stopped = |runner: &Self, process: &Process, stop| match stop {
            Stop::TooLarge(size) => TaskError::Guest(format!(
                "split made a taskunit of {size} bytes, over the {MAX_TASKUNIT}-byte limit"
            )),
            stop => runner.stopped(stop, &process.stderr_tail()),
        };
        let mut emitted = 0;
        let mut deadline = Instant::now() + self.limits.time;
        loop {
            let (tag, payload, _) = process
                .answer(deadline, MAX_TASKUNIT)
                .map_err(|stop| stopped(&self, &process, stop))?;
            let waited = Instant::now();
            match tag {
                READ => {
                    let want = u32::from_le_bytes(payload.try_into().unwrap_or_default());
                    let block = crate::input::read_block(&mut input, want)
                        .map_err(|e| TaskError::Guest(format!("reading job input: {e}")))?;
                    process
                        .send(&block, Instant::now() + self.limits.time)
                        .map_err(|stop| stopped(&self, &process, stop))?;
                }
                EMIT => {
                    emit(SharedBytes::from(payload)).map_err(TaskError::Guest)?;
                    emitted += 1;
                }
                OK => return Ok(SplitOutcome::Emitted(emitted)),
                NOT_HERE if emitted == 0 => return Ok(SplitOutcome::Default),
                ERROR => return Err(TaskError::Guest(String::from_utf8_lossy(&payload).into())),
                NO_MEMORY => return Err(TaskError::OutOfMemory(self.limits.memory)),
                _ => return Err(TaskError::Trap(format!("the split answered {tag}"))),
            }
            // Waiting on the input or on workers is not the split's time.
            deadline += waited.elapsed();
        }
    }

    /// A process with the job imported, for one call of `mode` (`split`
    /// or `combine`); the import's error if it failed.
    fn start_once(&mut self, mode: &str) -> Result<Process, TaskError> {
        match self.start_as(&[mode])? {
            Some(process) => Ok(process),
            None => Err(TaskError::Guest(
                self.load_error
                    .take()
                    .expect("no process: the import failed"),
            )),
        }
    }

    /// A new process with the job imported; `None` if the import failed
    /// (the error is noted as every taskunit's, and the process has ended).
    fn start(&mut self) -> Result<Option<Process>, TaskError> {
        self.start_as(&[])
    }

    /// [`Self::start`], with `args` for the Python loop.
    fn start_as(&mut self, args: &[&str]) -> Result<Option<Process>, TaskError> {
        let source = [python::JOB, python::NATIVE].concat();
        let memory = (self.limits.memory as u64).saturating_add(BASE_MEMORY);
        let args: Vec<&str> = ["-c", &source]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let mut child = self
            .python
            .inner
            .command(&args, memory)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| TaskError::Load(format!("cannot start native Python: {e}")))?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let mut err_pipe = child.stderr.take().expect("piped");
        let tail = stderr.clone();
        std::thread::Builder::new()
            .name("antnest-native-stderr".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = err_pipe.read(&mut buf) {
                    let mut t = tail.lock().unwrap();
                    t.extend(&buf[..n]);
                    let over = t.len().saturating_sub(STDERR_TAIL);
                    t.drain(..over);
                }
            })
            .map_err(|e| TaskError::Load(format!("cannot start native Python: {e}")))?;
        let mut process = Process {
            stdin: child.stdin.take().expect("piped"),
            stdout: child.stdout.take().expect("piped"),
            buf: Vec::new(),
            start: 0,
            end: 0,
            child,
            stderr,
        };
        // Reads and writes wait with poll, to keep to a deadline.
        non_blocking(process.stdin.as_fd());
        non_blocking(process.stdout.as_fd());
        // A big taskunit (a W3 chunk is 1 MB) crosses in a few pieces, not
        // sixteen 64 KiB ones, each a wake-up of the process.
        for fd in [process.stdin.as_fd(), process.stdout.as_fd()] {
            pipe_size(fd, PIPE_SIZE);
        }
        let files = self.files.clone();
        let started = process.call(&files, Instant::now() + START_MAX, usize::MAX);
        match started {
            Ok((OK, _, _)) => {}
            Ok((_, why, _)) => {
                self.load_error = Some(String::from_utf8_lossy(&why).into());
                return Ok(None);
            }
            Err(Stop::Deadline) => {
                return Err(TaskError::Load(format!(
                    "native Python did not import the job within {START_MAX:?}"
                )));
            }
            Err(Stop::TooLarge(_)) => unreachable!("no limit on the first answer"),
            Err(Stop::Died(why)) => {
                return Err(TaskError::Load(format!(
                    "native Python did not start: {why}\n{}",
                    process.stderr_tail()
                )));
            }
        }
        Ok(Some(process))
    }
}

impl Process {
    fn stderr_tail(&self) -> String {
        let t = self.stderr.lock().unwrap();
        String::from_utf8_lossy(&t.iter().copied().collect::<Vec<_>>())
            .trim()
            .to_owned()
    }

    /// Read until at least `n` bytes wait in `buf[start..]`.
    fn fill(&mut self, n: usize, deadline: Instant) -> Result<(), Stop> {
        while self.end - self.start < n {
            if self.start + n > self.buf.len() {
                // No room for them after `start`: what waits goes to the
                // front, and the buffer grows if it is still too small.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() < n.max(READ_CHUNK) {
                    self.buf.resize(n.max(READ_CHUNK), 0);
                }
            }
            self.end += read_some(&mut self.stdout, &mut self.buf[self.end..], deadline)?;
        }
        Ok(())
    }

    /// Send one frame and read its answer: (tag, payload, printed).
    fn call(
        &mut self,
        frame: &[u8],
        deadline: Instant,
        max_payload: usize,
    ) -> Result<(u8, Vec<u8>, String), Stop> {
        self.send(frame, deadline)?;
        self.answer(deadline, max_payload)
    }

    /// Send one frame.
    fn send(&mut self, frame: &[u8], deadline: Instant) -> Result<(), Stop> {
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|&n| n != END)
            .ok_or_else(|| Stop::Died("frame too large".into()))?;
        if frame.len() <= SMALL_FRAME {
            // One write for a small taskunit.
            let whole = [&len.to_le_bytes()[..], frame].concat();
            write_until(&mut self.stdin, &whole, deadline)
        } else {
            write_until(&mut self.stdin, &len.to_le_bytes(), deadline)?;
            write_until(&mut self.stdin, frame, deadline)
        }
    }

    /// Read the next answer: (tag, payload, printed).
    fn answer(
        &mut self,
        deadline: Instant,
        max_payload: usize,
    ) -> Result<(u8, Vec<u8>, String), Stop> {
        self.fill(9, deadline)?;
        let head: [u8; 9] = self.buf[self.start..][..9].try_into().expect("9 bytes");
        let size = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
        let printed = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes")) as usize;
        if size > max_payload {
            return Err(Stop::TooLarge(size));
        }
        if printed > CAPTURE_MAX * 4 {
            return Err(Stop::Died(format!("{printed} bytes of output captured")));
        }
        self.fill(9 + size + printed, deadline)?;
        let answer = &self.buf[self.start + 9..self.start + 9 + size + printed];
        let payload = answer[..size].to_vec();
        let text =
            String::from_utf8_lossy(&answer[size..][..printed.min(CAPTURE_MAX)]).into_owned();
        self.start += 9 + size + printed;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        Ok((head[0], payload, text))
    }
}

/// Wait until `fd` is ready for `events`, or `deadline`.
fn ready(fd: BorrowedFd<'_>, events: libc::c_short, deadline: Instant) -> Result<(), Stop> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Stop::Deadline);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for a descriptor `fd` keeps open.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(Stop::Died(std::io::Error::last_os_error().to_string()));
        }
    }
}

/// Ask for a pipe of `size` bytes (Linux; past `/proc/sys/fs/pipe-max-size`
/// it stays as it was, which only costs speed).
fn pipe_size(fd: BorrowedFd<'_>, size: usize) {
    // SAFETY: fcntl on a descriptor `fd` keeps open.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int);
    }
}

/// Put `fd` in non-blocking mode.
fn non_blocking(fd: BorrowedFd<'_>) {
    // SAFETY: fcntl on a descriptor `fd` keeps open.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// Write all of `bytes` to the (non-blocking) pipe by `deadline`.
fn write_until(pipe: &mut ChildStdin, mut bytes: &[u8], deadline: Instant) -> Result<(), Stop> {
    while !bytes.is_empty() {
        match pipe.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ready(pipe.as_fd(), libc::POLLOUT, deadline)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Stop::Died(e.to_string())),
        }
    }
    Ok(())
}

/// Read what the (non-blocking) pipe has into `buf`, waiting for some by
/// `deadline`; how much was read.
fn read_some(pipe: &mut ChildStdout, buf: &mut [u8], deadline: Instant) -> Result<usize, Stop> {
    loop {
        match pipe.read(buf) {
            Ok(0) => return Err(Stop::Died("it closed its output".into())),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ready(pipe.as_fd(), libc::POLLIN, deadline)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Stop::Died(e.to_string())),
        }
    }
}

//! Compiling a component in a child process of its own, bounded in time
//! and memory ([`Compiler`]). Cranelift cannot be stopped midway, and a
//! module crafted to compile for minutes or to take gigabytes would
//! otherwise cost its peer that much: in a child, past its time the
//! compile is killed, past its memory (an address-space cap) it fails,
//! and the peer goes on. The child is the peer's own program
//! (`antnest compile-module`), which calls [`child_main`]: the same
//! engine configuration, so the parent can load what it made.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How to run a compile in a child process, and its bounds.
#[derive(Debug, Clone)]
pub struct Compiler {
    /// The program and its arguments, which must end in [`child_main`].
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Wall time a compile may take.
    pub time: Duration,
    /// Address space the compiling process may map, in bytes.
    pub memory: u64,
}

/// The most of the child's stderr kept to explain a failure.
const STDERR_KEPT: usize = 4096;

impl Compiler {
    /// `bytes` compiled in a child: the serialized component, or why not.
    pub(crate) fn compile(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cap_address_space(&mut cmd, self.memory);
        let memory_mb = self.memory >> 20;
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "cannot start the compiler {} with at most {memory_mb} MiB of memory: {e}",
                self.program.display()
            )
        })?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let deadline = Instant::now() + self.time;
        std::thread::scope(|s| {
            // The pipes are fed and drained on threads of their own, so the
            // child never waits on a full pipe while this one waits on it.
            s.spawn(move || {
                let _ = stdin.write_all(bytes);
            });
            let out = s.spawn(move || {
                let mut out = Vec::new();
                let _ = stdout.read_to_end(&mut out);
                out
            });
            let err = s.spawn(move || {
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stderr.read(&mut buf) {
                    all.extend_from_slice(&buf[..n]);
                    let over = all.len().saturating_sub(STDERR_KEPT);
                    all.drain(..over);
                }
                String::from_utf8_lossy(&all).trim().to_string()
            });
            let mut pause = Duration::from_millis(1);
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!(
                            "compiling took longer than {:?} (stopped)",
                            self.time
                        ));
                    }
                    Ok(None) => {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(20));
                    }
                    Err(e) => return Err(format!("waiting for the compiler: {e}")),
                }
            };
            let out = out.join().unwrap_or_default();
            let err = err.join().unwrap_or_default();
            if status.success() {
                return Ok(out);
            }
            let short_of_memory = [
                "memory allocation",
                "out of memory",
                "Cannot allocate memory",
            ]
            .iter()
            .any(|m| err.contains(m));
            Err(if short_of_memory {
                format!("compiling needed more than {memory_mb} MiB of memory (stopped)")
            } else if let Some(sig) = status.signal() {
                format!(
                    "the compiler was killed by signal {sig} (it may have used up its {memory_mb} MiB of memory): {err}"
                )
            } else if err.is_empty() {
                format!("the compiler failed ({status})")
            } else {
                err
            })
        })
    }
}

/// Start `cmd`'s process with at most `bytes` of address space.
pub(crate) fn cap_address_space(cmd: &mut Command, bytes: u64) {
    // SAFETY: setrlimit is async-signal-safe and touches only the
    // child's own limits, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The child's side: a component on stdin, its compiled form on stdout,
/// an error on stderr and exit code 1. Uses the engine configuration of
/// every [`crate::Sandbox`].
pub fn child_main() -> std::process::ExitCode {
    let run = || -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading the module: {e}"))?;
        let engine = wasmtime::Engine::new(&crate::engine::engine_config())
            .map_err(|e| format!("engine: {e}"))?;
        engine
            .precompile_component(&bytes)
            .map_err(|e| format!("{e:#}"))
    };
    match run() {
        Ok(out) => match std::io::stdout().lock().write_all(&out) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("writing the compiled module: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

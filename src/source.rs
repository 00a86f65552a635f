//! Turning what the user names as JOB into component bytes: a `.wasm`
//! component as is, a Rust job crate (built with cargo for
//! `wasm32-wasip2`), or a Python file in the original antnest style (its
//! files appended to antnest's Python runner, built once with
//! componentize-py; see `crates/sandbox/python/antnest_runner.py`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use antnest_sandbox::job_files::{self, Bundle};
use antnest_sandbox::python;
use sha2::{Digest, Sha256};

/// The job contract, compiled into the binary so Python jobs can be built anywhere.
pub const JOB_WIT: &str = include_str!("../wit/job.wit");

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a job: give a .wasm component, a Rust job crate directory or a .py file")]
    Unknown(PathBuf),
    #[error("building {path} failed: {reason}")]
    Build { path: PathBuf, reason: String },
    #[error(
        "componentize-py is needed to build Python jobs but was not found; install it with `pip install componentize-py==0.25.1`"
    )]
    NoComponentizePy,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Whether `job` names a Python job (a `.py` file).
pub fn is_python(job: &Path) -> bool {
    job.extension().is_some_and(|x| x == "py")
}

/// The component bytes for JOB. `cache_dir` keeps built Python jobs;
/// `python_path` lists folders of pure-Python packages a Python job
/// imports (e.g. made by `pip install --target DIR`), bundled with it.
pub fn load(
    job: &Path,
    cache_dir: Option<&Path>,
    python_path: &[PathBuf],
) -> Result<Vec<u8>, SourceError> {
    if job.is_dir() {
        if job.join("Cargo.toml").is_file() {
            return build_rust(job);
        }
        return Err(SourceError::Unknown(job.to_owned()));
    }
    if is_python(job) {
        return build_python(job, cache_dir, python_path);
    }
    match job.extension().and_then(|e| e.to_str()) {
        Some("wasm") => std::fs::read(job).map_err(io(job)),
        _ => Err(SourceError::Unknown(job.to_owned())),
    }
}

fn build_rust(dir: &Path) -> Result<Vec<u8>, SourceError> {
    let fail = |reason: String| SourceError::Build {
        path: dir.to_owned(),
        reason,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "cargo exited with {} (is the target installed? `rustup target add wasm32-wasip2`)",
            out.status
        )));
    }
    let manifest = std::fs::canonicalize(dir.join("Cargo.toml")).map_err(io(dir))?;
    let mut wasm = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let from_this_crate = msg["manifest_path"]
            .as_str()
            .is_some_and(|p| Path::new(p) == manifest);
        if !from_this_crate {
            continue;
        }
        for f in msg["filenames"].as_array().into_iter().flatten() {
            if let Some(f) = f.as_str().filter(|f| f.ends_with(".wasm")) {
                wasm = Some(PathBuf::from(f));
            }
        }
    }
    let wasm = wasm.ok_or_else(|| fail("cargo built no .wasm (is the crate a cdylib?)".into()))?;
    std::fs::read(&wasm).map_err(io(&wasm))
}

/// The entries of `dir`, by name (so that what is built from them, and
/// the build cache's key, do not depend on the order the disk lists them).
fn sorted_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>, SourceError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// The files under `root` a Python job may import, as (path relative to
/// `root`, contents), but for `__pycache__` folders and compiled bytecode.
/// Of `root`'s own entries, only those `top` keeps (given the entry's path
/// and whether it is a folder).
fn python_files(
    root: &Path,
    top: &dyn Fn(&Path, bool) -> bool,
) -> Result<Vec<(PathBuf, Vec<u8>)>, SourceError> {
    type Keep<'a> = Option<&'a dyn Fn(&Path, bool) -> bool>;
    fn walk(
        root: &Path,
        rel: &Path,
        top: Keep<'_>,
        out: &mut Vec<(PathBuf, Vec<u8>)>,
    ) -> Result<(), SourceError> {
        for e in sorted_entries(&root.join(rel))? {
            let name = PathBuf::from(e.file_name());
            let path = e.path();
            let dir = path.is_dir();
            if top.is_some_and(|keep| !keep(&path, dir)) {
                continue;
            }
            if dir {
                if name != Path::new("__pycache__") {
                    walk(root, &rel.join(&name), None, out)?;
                }
            } else if name.extension().is_none_or(|x| x != "pyc") {
                let bytes = std::fs::read(&path).map_err(io(&path))?;
                out.push((rel.join(name), bytes));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), Some(top), &mut out)?;
    Ok(out)
}

/// The Python files that go with the job file `file` in `dir`: modules
/// (`*.py`) and packages (folders with an `__init__.py`) beside it. Not
/// the job file itself.
fn helpers(file: &Path, dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, SourceError> {
    let mut out = python_files(dir, &|path, is_dir| {
        if is_dir {
            path.join("__init__.py").is_file()
        } else {
            path.extension().is_some_and(|x| x == "py")
        }
    })?;
    out.retain(|(rel, _)| Some(rel.as_os_str()) != file.file_name());
    Ok(out)
}

/// Every file of a `--python-path` folder.
fn package_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, SourceError> {
    if !dir.is_dir() {
        return Err(SourceError::Io {
            path: dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
        });
    }
    python_files(dir, &|_, _| true)
}

/// A Python job: antnest's runner with the job's files appended (the job
/// file, the modules and packages beside it, the `--python-path`
/// folders', in the order Python would look for them). Only the runner
/// is built (once per machine, cached); the job's own code is not
/// compiled anywhere, so editing it costs nothing but sending it.
fn build_python(
    file: &Path,
    cache_dir: Option<&Path>,
    python_path: &[PathBuf],
) -> Result<Vec<u8>, SourceError> {
    let fail = |reason: String| SourceError::Build {
        path: file.to_owned(),
        reason,
    };
    let source = std::fs::read(file).map_err(io(file))?;
    let module = file
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .ok_or_else(|| fail("the file name must be a Python module name".into()))?;
    let job_dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut bundle = Bundle::new(module);
    bundle.file(
        &format!("{module}.py"),
        &file.display().to_string(),
        &source,
    );
    let mut folders = vec![(job_dir.to_owned(), helpers(file, job_dir)?)];
    for d in python_path {
        folders.push((d.clone(), package_files(d)?));
    }
    for (dir, files) in &folders {
        for (rel, bytes) in files {
            let label = dir.join(rel).display().to_string();
            bundle.file(&rel.to_string_lossy().replace('\\', "/"), &label, bytes);
        }
    }
    let runner = python_runner(cache_dir, &fail)?;
    Ok(job_files::append(&runner, &bundle))
}

/// The runner component, from the cache or built with componentize-py;
/// `fail` names what the build was for in its errors.
fn python_runner(
    cache_dir: Option<&Path>,
    fail: &dyn Fn(String) -> SourceError,
) -> Result<Vec<u8>, SourceError> {
    let key = Sha256::new()
        .chain_update(python::RUNNER)
        .chain_update(python::JOB)
        .chain_update(JOB_WIT)
        .finalize();
    let cached = cache_dir.map(|d| {
        d.join("python")
            .join(format!("runner-{}.wasm", hex::encode(key)))
    });
    if let Some(bytes) = cached.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bytes);
    }
    // One build at a time per cache (submits started together, the tests):
    // the others wait and take what it built.
    let _lock = cached.as_deref().and_then(build_lock);
    if let Some(bytes) = cached.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bytes);
    }
    let work = tempfile_dir().map_err(|e| fail(e.to_string()))?;
    let result = (|| {
        let write = |name: &str, text: &str| {
            let path = work.join(name);
            std::fs::write(&path, text).map_err(|e| fail(format!("{}: {e}", path.display())))
        };
        std::fs::create_dir_all(work.join("wit")).map_err(|e| fail(e.to_string()))?;
        write("wit/job.wit", JOB_WIT)?;
        write("antnest_runner.py", python::RUNNER)?;
        write("antnest_job.py", python::JOB)?;
        let out = Command::new("componentize-py")
            // Its own Rust backtrace would bury the reason.
            .env("RUST_BACKTRACE", "0")
            .args(["-d", "wit", "-w", "python-job", "componentize", "-p", "."])
            .args(["antnest_runner", "-o", "runner.wasm"])
            .current_dir(&work)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output();
        let out = match out {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SourceError::NoComponentizePy);
            }
            Err(e) => return Err(fail(format!("cannot run componentize-py: {e}"))),
            Ok(out) => out,
        };
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.trim().lines().collect();
            return Err(fail(format!(
                "componentize-py could not build antnest's Python runner:\n{}",
                lines[lines.len().saturating_sub(12)..].join("\n")
            )));
        }
        std::fs::read(work.join("runner.wasm")).map_err(|e| fail(e.to_string()))
    })();
    let _ = std::fs::remove_dir_all(&work);
    let bytes = result?;
    if let Some(path) = cached
        && let Some(parent) = path.parent()
        && std::fs::create_dir_all(parent).is_ok()
    {
        // A cache: a failed write only means building again next time.
        let _ = antnest_proto::write_atomic(&path, &bytes);
    }
    Ok(bytes)
}

/// An exclusive lock on a file beside `path`, held until the file closes;
/// `None` if it cannot be had (the build goes on unlocked).
fn build_lock(path: &Path) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let parent = path.parent()?;
    std::fs::create_dir_all(parent).ok()?;
    let file = std::fs::File::create(path.with_extension("lock")).ok()?;
    // SAFETY: flock on a descriptor this function owns; it blocks until
    // the lock is free.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0;
    locked.then_some(file)
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "antnest-py-{}-{}",
        std::process::id(),
        antnest_proto::JobId::random()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

//! Turning what the user names as JOB into component bytes: a `.wasm`
//! component as is, a Rust job crate (built with cargo for
//! `wasm32-wasip2`), or a Python file in the original antnest style (wrapped
//! and built with componentize-py, cached by the hash of its source).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    match job.extension().and_then(|e| e.to_str()) {
        Some("wasm") => std::fs::read(job).map_err(io(job)),
        Some("py") => build_python(job, cache_dir, python_path),
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

/// The glue between the original's plain functions and the WIT world.
///
/// Both styles of job run: today's plain functions (`processor(x)`,
/// `split(data)`, `combine(results)`) and the original antnest's methods
/// (`processor(self, x)`, `split(self, input_data, processor)` yielding
/// `taskunit.TaskUnit(data=..., processor=...)`, `combine(self)` reading
/// `self.taskunits` and printing the output). A job whose `combine` takes
/// `self` gets, with each result, the taskunit it came from.
///
/// Values: a `str` travels as its UTF-8 text (so the host's line split and
/// default combine see text, as before); any other value a split yields or
/// a processor returns travels pickled (a pickle starts with byte 0x80,
/// which no UTF-8 text does), and is only ever unpickled inside the
/// sandbox. A job without `combine` gets the text of non-str results
/// (`str(value)`), for the host's default combine. A split whose first
/// argument is named `lines` or `blocks` gets the input as an iterator of
/// lines (str, without their line end) or blocks (bytes) instead of one
/// string. The module's `input_data` is the input when the job is given
/// none.
const PY_WRAPPER: &str = r#"
import inspect
import io
import pickle
import sys
import types

import wit_world
from wit_world.imports import host
from componentize_py_types import Err


class TaskUnit:
    """The original antnest's taskunit: its data, and its result once run."""

    def __init__(self, data=None, processor=None, **fields):
        self.data = data
        self.processor = processor
        self.result = None
        self.__dict__.update(fields)


# The original's jobs `import taskunit` inside `split`.
_taskunit = types.ModuleType("taskunit")
_taskunit.TaskUnit = TaskUnit
sys.modules.setdefault("taskunit", _taskunit)

import __USER_MODULE__ as _job

class JobError(Exception):
    """A job file that is not a job."""


if not callable(getattr(_job, "processor", None)):
    raise JobError(
        "__USER_MODULE__.py defines no processor(): a job needs at least "
        "`def processor(taskunit): ...`"
    )


class _Job:
    """The `self` the original's functions were methods of."""

    taskunits = []


_self = _Job()


def _takes_self(fn):
    params = list(inspect.signature(fn).parameters)
    return bool(params) and params[0] == "self"


def _call(fn, *args):
    """`fn` with as many of `args` as it takes, after `self` if it has one."""
    params = list(inspect.signature(fn).parameters.values())
    lead = ()
    if params and params[0].name == "self":
        lead, params = (_self,), params[1:]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return fn(*lead, *args)
    n = sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return fn(*lead, *args[:n])


_COMBINE = getattr(_job, "combine", None)
# Results carry their taskunit's data for a combine that reads self.taskunits.
_PAIRS = _COMBINE is not None and _takes_self(_COMBINE)


def _text(data):
    if isinstance(data, (bytes, bytearray)):
        return bytes(data).decode("utf-8")
    return str(data)


def _encode(value):
    """A value for the wire: text stays text, anything else is pickled."""
    if isinstance(value, str):
        return value.encode("utf-8")
    return pickle.dumps(value)


def _decode(data):
    """What `_encode` made (or text from the host's line split)."""
    if data[:1] == b"\x80":
        return pickle.loads(data)
    return data.decode("utf-8")


def _output(value):
    """What a job's combine returns or prints, as the job's output."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return str(value).encode("utf-8")


def _blocks():
    while True:
        block = host.read_input(1 << 20)
        if not block:
            return
        yield block


def _lines():
    rest = b""
    for block in _blocks():
        *lines, rest = (rest + block).split(b"\n")
        for line in lines:
            yield (line[:-1] if line.endswith(b"\r") else line).decode("utf-8")
    if rest:
        yield rest.decode("utf-8")


def _first_arg(fn):
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    return params[0] if params else None


def _fail(where, e):
    raise Err(f"{where}: {type(e).__name__}: {e}")


def _read_all():
    chunks = []
    while True:
        block = host.read_input(1 << 20)
        if not block:
            break
        chunks.append(block)
    return b"".join(chunks).decode("utf-8")


class WitWorld(wit_world.WitWorld):
    def split(self) -> bool:
        split = getattr(_job, "split", None)
        given = hasattr(_job, "input_data")
        if split is None and not given:
            return False  # the host splits the input by lines
        streamed = split is not None and _first_arg(split) in ("lines", "blocks")
        if streamed:
            data = _lines() if _first_arg(split) == "lines" else _blocks()
        else:
            data = _read_all()
            if data == "" and given:
                data = _text(_job.input_data)
        try:
            if split is None:
                lines = data.split("\n")
                if lines and lines[-1] == "":
                    lines.pop()
                units = (l[:-1] if l.endswith("\r") else l for l in lines)
            else:
                units = _call(split, data, _job.processor)
            for unit in units:
                if isinstance(unit, TaskUnit):
                    unit = unit.data
                host.emit(_encode(unit))
        except Err:
            raise
        except Exception as e:
            _fail("split", e)
        return True

    def process(self, unit: bytes) -> bytes:
        try:
            data = _decode(unit)
            result = _call(_job.processor, data)
        except Exception as e:
            _fail("processor", e)
        try:
            if _PAIRS:
                return pickle.dumps((data, result))
            if _COMBINE is None and not isinstance(result, str):
                return _output(result)
            return _encode(result)
        except Exception as e:
            _fail("processor: its result cannot be pickled", e)

    def combine(self) -> bool:
        if _COMBINE is None:
            return False
        results = []
        while True:
            r = host.next_result()
            if r is None:
                break
            results.append(r)
        printed = io.StringIO()
        stdout, sys.stdout = sys.stdout, printed
        try:
            if _PAIRS:
                units = []
                for r in results:
                    data, result = pickle.loads(r)
                    t = TaskUnit(data=data, processor=_job.processor)
                    t.result = result
                    units.append(t)
                _self.taskunits = units
                out = _call(_COMBINE)
            else:
                out = _call(_COMBINE, [_decode(r) for r in results])
        except Exception as e:
            _fail("combine", e)
        finally:
            sys.stdout = stdout
        # What combine returns is the output; if nothing, what it printed.
        host.write_output(_output(printed.getvalue() if out is None else out))
        return True
"#;

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

/// The Python files that go with a job file: modules (`*.py`) beside it
/// and packages (folders with an `__init__.py`) beside it, each as (path
/// relative to the job's folder, contents). Not the job file itself.
fn helpers(file: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, SourceError> {
    fn walk(
        root: &Path,
        rel: &Path,
        top: bool,
        out: &mut Vec<(PathBuf, Vec<u8>)>,
    ) -> Result<(), SourceError> {
        for e in sorted_entries(&root.join(rel))? {
            let name = PathBuf::from(e.file_name());
            let path = e.path();
            if path.is_dir() {
                let package = path.join("__init__.py").is_file();
                if name != Path::new("__pycache__") && (package || !top) {
                    walk(root, &rel.join(&name), false, out)?;
                }
            } else if !top || name.extension().is_some_and(|x| x == "py") {
                let bytes = std::fs::read(&path).map_err(io(&path))?;
                out.push((rel.join(name), bytes));
            }
        }
        Ok(())
    }
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut out = Vec::new();
    walk(dir, Path::new(""), true, &mut out)?;
    out.retain(|(rel, _)| Some(rel.as_os_str()) != file.file_name());
    Ok(out)
}

/// What identifies the files under `dirs` for the build cache: each file's
/// path, size and modification time.
fn fingerprint(dirs: &[PathBuf]) -> Result<Vec<u8>, SourceError> {
    fn walk(dir: &Path, out: &mut Vec<u8>) -> Result<(), SourceError> {
        for e in sorted_entries(dir)? {
            let path = e.path();
            let meta = e.metadata().map_err(io(&path))?;
            if meta.is_dir() {
                walk(&path, out)?;
            } else {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .unwrap_or_default();
                out.extend_from_slice(path.to_string_lossy().as_bytes());
                out.extend_from_slice(&meta.len().to_le_bytes());
                out.extend_from_slice(&mtime.as_nanos().to_le_bytes());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for d in dirs {
        if !d.is_dir() {
            return Err(SourceError::Io {
                path: d.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
            });
        }
        walk(d, &mut out)?;
    }
    Ok(out)
}

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
    let helpers = helpers(file)?;
    let python_path: Vec<PathBuf> = python_path
        .iter()
        .map(|d| std::fs::canonicalize(d).map_err(io(d)))
        .collect::<Result<_, _>>()?;
    let mut key = Sha256::new()
        .chain_update(&source)
        .chain_update(PY_WRAPPER)
        .chain_update(JOB_WIT)
        .chain_update(module)
        .chain_update(fingerprint(&python_path)?);
    for (rel, bytes) in &helpers {
        key.update(rel.to_string_lossy().as_bytes());
        key.update((bytes.len() as u64).to_le_bytes());
        key.update(bytes);
    }
    let key = hex::encode(key.finalize());
    let cached = cache_dir.map(|d| d.join("python").join(format!("{key}.wasm")));
    if let Some(bytes) = cached.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bytes);
    }
    let work = tempfile_dir().map_err(|e| fail(e.to_string()))?;
    let result = (|| {
        std::fs::create_dir_all(work.join("wit")).map_err(io(&work))?;
        std::fs::write(work.join("wit/job.wit"), JOB_WIT).map_err(io(&work))?;
        for (rel, bytes) in &helpers {
            let to = work.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&to, bytes).map_err(io(&to))?;
        }
        std::fs::write(work.join(format!("{module}.py")), &source).map_err(io(&work))?;
        std::fs::write(
            work.join("antnest_app.py"),
            PY_WRAPPER.replace("__USER_MODULE__", module),
        )
        .map_err(io(&work))?;
        let out_file = work.join("job.wasm");
        let mut cmd = Command::new("componentize-py");
        // Its own Rust backtrace would bury the job's Python traceback.
        cmd.env("RUST_BACKTRACE", "0");
        cmd.args(["-d", "wit", "-w", "job", "componentize", "-p", "."]);
        for d in &python_path {
            cmd.arg("-p").arg(d);
        }
        let status = cmd
            .args(["antnest_app", "-o", "job.wasm"])
            .current_dir(&work)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output();
        let out = match status {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SourceError::NoComponentizePy);
            }
            Err(e) => return Err(fail(format!("cannot run componentize-py: {e}"))),
            Ok(out) => out,
        };
        if !out.status.success() {
            return Err(fail(python_error(&out.stderr, file, module, &python_path)));
        }
        std::fs::read(&out_file).map_err(io(&out_file))
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

/// componentize-py's report of a failed build, as the user should see it:
/// the job's Python traceback (where the cause is, with its file and
/// line), with the build's paths turned back into the job's own (the
/// build sees python-path entry N as `/N/`, the job's folder as `/0/`).
fn python_error(stderr: &[u8], file: &Path, module: &str, python_path: &[PathBuf]) -> String {
    let stderr = String::from_utf8_lossy(stderr);
    let report = stderr.split("\nCaused by:").next().unwrap_or_default();
    let Some(start) = report.rfind("Traceback (most recent call last):") else {
        let lines: Vec<&str> = stderr.trim().lines().collect();
        return lines[lines.len().saturating_sub(12)..].join("\n");
    };
    let job_dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut text = report[start..]
        .trim()
        .replace(
            &format!("\"/0/{module}.py\""),
            &format!("{:?}", file.display().to_string()),
        )
        .replace("\"/0/antnest_app.py\"", "\"<antnest's wrapper>\"")
        .replace("\"/0/", &format!("\"{}/", job_dir.display()));
    for (i, d) in python_path.iter().enumerate() {
        text = text.replace(&format!("\"/{}/", i + 1), &format!("\"{}/", d.display()));
    }
    text
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

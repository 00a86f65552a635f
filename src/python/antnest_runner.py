"""antnest's Python runner: one component that runs any Python job.

The component is built once (componentize-py, then Cranelift on each peer)
and is the same for every Python job; a job's own files travel beside it,
as data (`host.job_files()`), and are imported from memory the first time
the job is called. Editing a job therefore builds and compiles nothing.

componentize-py snapshots the interpreter after this module is imported,
and what was not imported then cannot be imported later (the standard
library's files are not in the component), so the standard library is
imported here, once, as far as it imports in a sandbox.

Both styles of job run: today's plain functions (`processor(x)`,
`split(data)`, `combine(results)`) and the original antnest's methods
(`processor(self, x)`, `split(self, input_data, processor)` yielding
`taskunit.TaskUnit(data=..., processor=...)`, `combine(self)` reading
`self.taskunits` and printing the output). A job whose `combine` takes
`self` gets, with each result, the taskunit it came from.

Values: a `str` travels as its UTF-8 text (so the host's line split and
default combine see text); any other value a split yields or a processor
returns travels pickled (a pickle starts with byte 0x80, which no UTF-8
text does), and is only ever unpickled inside the sandbox. A job without
`combine` gets the text of non-str results (`str(value)`), for the host's
default combine. A split whose first argument is named `lines` or
`blocks` gets the input as an iterator of lines (str, without their line
end) or blocks (bytes) instead of one string. The module's `input_data`
is the input when the job is given none.
"""

import importlib
import importlib.abc
import importlib.util
import inspect
import io
import pickle
import sys
import traceback
import types

import wit_world
from wit_world.imports import host
from componentize_py_types import Err

# Modules that must not be imported at build time: they do something when
# imported (print, open a browser), need a display or a terminal, or are
# tools and tests rather than a library.
_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
    "test", "tests", "lib2to3", "ensurepip", "venv", "pydoc_data", "curses",
    "readline", "msilib", "winreg", "winsound", "msvcrt", "_winapi", "nt",
    "__main__", "__phello__", "_pyrepl", "pip", "idle_test",
}


def _preload():
    """Import the standard library (and its packages' submodules)."""
    import pkgutil

    for name in sorted(sys.stdlib_module_names):
        if name in _SKIP:
            continue
        try:
            module = importlib.import_module(name)
        except BaseException:
            continue
        path = getattr(module, "__path__", None)
        if not path:
            continue
        for info in pkgutil.walk_packages(path, name + ".", onerror=lambda _: None):
            if _SKIP.intersection(info.name.split(".")) or "__main__" in info.name:
                continue
            try:
                importlib.import_module(info.name)
            except BaseException:
                pass


_preload()


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


class _Files(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the job's modules from its files, held in memory.

    First on `sys.meta_path`, as a script's folder is first on
    `sys.path`: the job's own modules win over the standard library's.
    """

    def __init__(self, files):
        # "pkg/mod.py" -> (the file's name as the user knows it, source)
        self.files = files

    def _entry(self, name):
        base = name.replace(".", "/")
        for rel, package in ((base + "/__init__.py", True), (base + ".py", False)):
            if rel in self.files:
                return rel, package
        return None

    def find_spec(self, name, path=None, target=None):
        found = self._entry(name)
        if found is None:
            return None
        rel, package = found
        spec = importlib.util.spec_from_loader(
            name, self, origin=self.files[rel][0], is_package=package
        )
        spec.has_location = True
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        rel, _ = self._entry(module.__name__)
        label, source = self.files[rel]
        module.__file__ = label
        exec(compile(source, label, "exec", dont_inherit=True), module.__dict__)

    def get_source(self, name):
        """For tracebacks: the lines of the job's own files."""
        found = self._entry(name)
        return None if found is None else self.files[found[0]][1].decode("utf-8", "replace")


def _unpack(data):
    """The job's files as the submitter packed them (see source.rs):
    the main module's name, then (path, label, contents) for each file,
    every field a u32 LE length and that many bytes."""
    view = memoryview(data)
    at = 0

    def field():
        nonlocal at
        n = int.from_bytes(view[at:at + 4], "little")
        at += 4
        out = bytes(view[at:at + n])
        at += n
        return out

    main = field().decode("utf-8")
    files = {}
    while at < len(view):
        rel = field().decode("utf-8")
        label = field().decode("utf-8")
        files.setdefault(rel, (label, field()))
    return main, files


class JobError(Exception):
    """A job file that is not a job."""


class _Job:
    """The `self` the original's functions were methods of."""

    taskunits = []


_self = _Job()


class _Loaded:
    """The job, imported, with what the glue needs to know about it."""

    def __init__(self):
        main, files = _unpack(host.job_files())
        _labels.update(label for label, _ in files.values())
        sys.meta_path.insert(0, _Files(files))
        self.job = importlib.import_module(main)
        if not callable(getattr(self.job, "processor", None)):
            raise JobError(
                f"{files[main + '.py'][0]} defines no processor(): a job needs "
                "at least `def processor(taskunit): ...`"
            )
        self.combine = getattr(self.job, "combine", None)
        # Results carry their taskunit's data for a combine that reads
        # self.taskunits.
        self.pairs = self.combine is not None and _takes_self(self.combine)


_loaded = None
# The names of the job's files, as the user knows them: the frames of a
# traceback worth showing.
_labels = set()


def _job():
    """The job, imported on first use; `Err` with its traceback if it cannot be."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = _Loaded()
        except JobError as e:
            raise Err(f"cannot load the job: {e}")
        except BaseException as e:
            raise Err("cannot load the job:\n" + _traceback(e))
    return _loaded


def _job_frames(e):
    """The frames of `e`'s traceback in the job's own files."""
    return [f for f in traceback.extract_tb(e.__traceback__) if f.filename in _labels]


def _traceback(e):
    """`e`'s traceback, the job's own frames only."""
    frames = _job_frames(e)
    text = "Traceback (most recent call last):\n" if frames else ""
    text += "".join(traceback.format_list(frames))
    return text + "".join(traceback.format_exception_only(type(e), e))


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
    """Fail the call with `e`, and where in the job's files it was raised."""
    frames = _job_frames(e)
    at = ""
    if frames:
        f = frames[-1]
        at = f" (at {f.filename}, line {f.lineno}, in {f.name})"
    raise Err(f"{where}: {type(e).__name__}: {e}{at}")


def _read_all():
    return b"".join(_blocks()).decode("utf-8")


class WitWorld(wit_world.WitWorld):
    def split(self) -> bool:
        job = _job().job
        split = getattr(job, "split", None)
        given = hasattr(job, "input_data")
        if split is None and not given:
            return False  # the host splits the input by lines
        streamed = split is not None and _first_arg(split) in ("lines", "blocks")
        if streamed:
            data = _lines() if _first_arg(split) == "lines" else _blocks()
        else:
            data = _read_all()
            if data == "" and given:
                data = _text(job.input_data)
        try:
            if split is None:
                lines = data.split("\n")
                if lines and lines[-1] == "":
                    lines.pop()
                units = (l[:-1] if l.endswith("\r") else l for l in lines)
            else:
                units = _call(split, data, job.processor)
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
        loaded = _job()
        try:
            data = _decode(unit)
            result = _call(loaded.job.processor, data)
        except Exception as e:
            _fail("processor", e)
        try:
            if loaded.pairs:
                return pickle.dumps((data, result))
            if loaded.combine is None and not isinstance(result, str):
                return _output(result)
            return _encode(result)
        except Exception as e:
            _fail("processor: its result cannot be pickled", e)

    def combine(self) -> bool:
        loaded = _job()
        if loaded.combine is None:
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
            if loaded.pairs:
                units = []
                for r in results:
                    data, result = pickle.loads(r)
                    t = TaskUnit(data=data, processor=loaded.job.processor)
                    t.result = result
                    units.append(t)
                _self.taskunits = units
                out = _call(loaded.combine)
            else:
                out = _call(loaded.combine, [_decode(r) for r in results])
        except Exception as e:
            _fail("combine", e)
        finally:
            sys.stdout = stdout
        # What combine returns is the output; if nothing, what it printed.
        host.write_output(_output(printed.getvalue() if out is None else out))
        return True

"""A Python job as antnest runs it, in either runtime.

The wasm runner (`antnest_runner.py`, CPython compiled to a component)
and the native loop (`antnest_native.py`, the worker's own CPython under
bubblewrap) both run a job through this module, so a job gives the same
results in both.

Both styles of job run: today's plain functions (`processor(x)`,
`split(data)`, `combine(results)`) and the original antnest's methods
(`processor(self, x)`, `split(self, input_data, processor)` yielding
`taskunit.TaskUnit(data=..., processor=...)`, `combine(self)` reading
`self.taskunits` and printing the output). A job whose `combine` takes
`self` gets, with each result, the taskunit it came from.

Values: a `str` travels as its UTF-8 text (so the host's line split and
default combine see text); any other value a split yields or a processor
returns travels pickled (a pickle starts with byte 0x80, which no UTF-8
text does), and is only ever unpickled inside a sandbox. A job without
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


class Failed(Exception):
    """A call of the job failed; the message says why and where."""


class TaskUnit:
    """The original antnest's taskunit: its data, and its result once run."""

    def __init__(self, data=None, processor=None, **fields):
        self.data = data
        self.processor = processor
        self.result = None
        self.__dict__.update(fields)


# The original's jobs `import taskunit` inside `split`. Named after that
# module, a pickled TaskUnit unpickles in either runtime.
TaskUnit.__module__ = "taskunit"
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


class _Job:
    """The `self` the original's functions were methods of."""

    taskunits = []


_self = _Job()
# The names of the job's files, as the user knows them: the frames of a
# traceback worth showing.
_labels = set()


class Loaded:
    """The job, imported, with what the calls need to know about it."""

    def __init__(self, job):
        self.job = job
        self.combine = getattr(job, "combine", None)
        # Results carry their taskunit's data for a combine that reads
        # self.taskunits.
        self.pairs = self.combine is not None and _takes_self(self.combine)


def load(bundle):
    """The job packed in `bundle`, imported; `Failed` with its traceback
    if it cannot be."""
    try:
        main, files = _unpack(bundle)
        _labels.update(label for label, _ in files.values())
        sys.meta_path.insert(0, _Files(files))
        # A module of the same name imported already (the standard
        # library's `platform`, say, in the wasm runner's snapshot) would
        # stand in for the job's own: the job's win, as a script's
        # folder does.
        for rel in files:
            name = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            sys.modules.pop(name, None)
        job = importlib.import_module(main)
    except BaseException as e:
        raise Failed("cannot load the job:\n" + _traceback(e))
    if not callable(getattr(job, "processor", None)):
        raise Failed(
            f"cannot load the job: {files[main + '.py'][0]} defines no processor(): "
            "a job needs at least `def processor(taskunit): ...`"
        )
    return Loaded(job)


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


# How each job function is called: (takes self, how many arguments; None
# for any number). Worked out once per function: `inspect.signature` costs
# more than a small taskunit's whole work.
_shapes = {}


def _shape(fn):
    shape = _shapes.get(fn)
    if shape is None:
        params = list(inspect.signature(fn).parameters.values())
        lead = bool(params) and params[0].name == "self"
        if lead:
            params = params[1:]
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            n = None
        else:
            n = sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        shape = _shapes[fn] = (lead, n)
    return shape


def _call(fn, *args):
    """`fn` with as many of `args` as it takes, after `self` if it has one."""
    lead, n = _shape(fn)
    if n is not None:
        args = args[:n]
    if lead:
        return fn(_self, *args)
    return fn(*args)


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


def _blocks(read_input):
    while True:
        block = read_input(1 << 20)
        if not block:
            return
        yield block


def _lines(read_input):
    rest = b""
    for block in _blocks(read_input):
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
    raise Failed(f"{where}: {type(e).__name__}: {e}{at}")


def split(loaded, read_input, emit):
    """Run the job's split (or split `input_data` by lines), emitting each
    taskunit; `False` if the job leaves the split to the host."""
    job = loaded.job
    fn = getattr(job, "split", None)
    given = hasattr(job, "input_data")
    if fn is None and not given:
        return False  # the host splits the input by lines
    streamed = fn is not None and _first_arg(fn) in ("lines", "blocks")
    if streamed:
        data = _lines(read_input) if _first_arg(fn) == "lines" else _blocks(read_input)
    else:
        data = b"".join(_blocks(read_input)).decode("utf-8")
        if data == "" and given:
            data = _text(job.input_data)
    try:
        if fn is None:
            lines = data.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            units = (l[:-1] if l.endswith("\r") else l for l in lines)
        else:
            units = _call(fn, data, job.processor)
        for unit in units:
            if isinstance(unit, TaskUnit):
                unit = unit.data
            emit(_encode(unit))
    except Failed:
        raise
    except Exception as e:
        _fail("split", e)
    return True


def process(loaded, unit):
    """One taskunit's result, as bytes for the wire."""
    try:
        data = _decode(unit)
        result = _call(loaded.job.processor, data)
    except MemoryError:
        raise
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


def render(loaded, r):
    """One result as it travels, as the text `--stream` prints: the value's
    `str`, as a job without a combine would have sent it."""
    try:
        value = pickle.loads(r)[1] if loaded.pairs else _decode(r)
        return _output(value)
    except Exception as e:
        _fail("render", e)


def combine(loaded, next_result, write_output):
    """Run the job's combine over every result; `False` if it has none
    (the host joins the results). Each result is decoded as it comes in,
    while the job's taskunits still run, so that little is left to decode
    once the last one is in."""
    if loaded.combine is None:
        return False
    results = iter(next_result, None)
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
    write_output(_output(printed.getvalue() if out is None else out))
    return True

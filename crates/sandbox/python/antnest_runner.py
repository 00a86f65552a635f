"""antnest's Python runner: one component that runs any Python job.

The component is built once (componentize-py, then Cranelift on each peer)
and is the same for every Python job; a job's own files travel beside it,
as data (`host.job_files()`), and are imported from memory the first time
the job is called. Editing a job therefore builds and compiles nothing.
What a job's calls do is `antnest_job`'s, shared with the native runtime.

componentize-py snapshots the interpreter after this module is imported,
and what was not imported then cannot be imported later (the standard
library's files are not in the component), so the standard library is
imported here, once, as far as it imports in a sandbox.
"""

import importlib
import sys

import antnest_job
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

_loaded = None


def _job():
    """The job, imported on first use."""
    global _loaded
    if _loaded is None:
        # The interpreter is a snapshot taken when the runner was built,
        # `random`'s state included: seed it afresh from WASI's random
        # numbers (the taskunit's own, for a deterministic job), or every
        # instance would draw the same numbers.
        import random

        random.seed()
        _loaded = antnest_job.load(host.job_files())
    return _loaded


def _guarded(call):
    """`call()`, its failure (a `MemoryError` included) as the call's `Err`."""
    try:
        return call()
    except antnest_job.Failed as e:
        raise Err(str(e))
    except MemoryError as e:
        raise Err(f"MemoryError: {e}")


class WitWorld(wit_world.WitWorld):
    def split(self) -> bool:
        return _guarded(lambda: antnest_job.split(_job(), host.read_input, host.emit))

    def process(self, unit: bytes) -> bytes:
        return _guarded(lambda: antnest_job.process(_job(), unit))

    def combine(self) -> bool:
        return _guarded(
            lambda: antnest_job.combine(_job(), host.next_result, host.write_output)
        )

    def render(self, result: bytes) -> bytes:
        return _guarded(lambda: antnest_job.render(_job(), result))

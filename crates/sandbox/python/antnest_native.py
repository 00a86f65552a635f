
# antnest's native Python loop: the worker's own CPython, under
# bubblewrap, running one Python job's taskunits one after another (see
# `native.rs`). Appended to `antnest_job.py`'s text and run with
# `python3 -c`, so nothing is written to disk and nothing can shadow it.
#
# On stdin, frames of a u32 LE length and that many bytes: the job's
# files first (answered once the job is imported; the process ends if
# it cannot be), then one taskunit per frame. Each answer on the original stdout: a tag byte (0 result, 1 job
# error, 2 out of memory), the payload's length and the captured output's
# length (u32 LE each), the payload, then what the call printed. What the
# job prints goes to that capture, and anything written to the process's
# own stdout goes to its stderr, so nothing but answers reaches the host.

import os as _os
import struct as _struct

_OK, _ERROR, _NO_MEMORY = 0, 1, 2
# An answer's head: its tag, the payload's length, the captured output's.
_HEAD = _struct.Struct("<BII")
# The most a taskunit's captured output may be; the host caps it too.
_CAPTURE_MAX = 64 << 10


def _native_main():
    stdin = sys.stdin.buffer
    answers = _os.fdopen(_os.dup(1), "wb")
    _os.dup2(2, 1)

    def read_frame():
        head = stdin.read(4)
        if len(head) < 4:
            return None
        n = int.from_bytes(head, "little")
        data = stdin.read(n)
        return data if len(data) == n else None

    def answer(tag, payload=b"", printed=""):
        # `answers` is buffered: a small answer leaves in one write, at the
        # flush.
        printed = printed.encode("utf-8", "replace")[:_CAPTURE_MAX] if printed else b""
        answers.write(_HEAD.pack(tag, len(payload), len(printed)))
        answers.write(payload)
        answers.write(printed)
        answers.flush()

    # One capture for every call, emptied after each (a new one per
    # taskunit costs more than a small taskunit's work).
    out = io.StringIO()

    def captured(call):
        """`call()`'s (tag, payload) and what it printed meanwhile."""
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        try:
            result = (_OK, call())
        except Failed as e:
            result = (_ERROR, str(e).encode("utf-8"))
        except MemoryError as e:
            result = (_NO_MEMORY, str(e).encode("utf-8"))
        finally:
            sys.stdout, sys.stderr = saved
        if not out.tell():
            return result, ""
        printed = out.getvalue()
        out.seek(0)
        out.truncate()
        return result, printed

    bundle = read_frame()
    if bundle is None:
        return
    (tag, loaded), printed = captured(lambda: load(bundle))
    answer(tag, b"" if tag == _OK else loaded, printed)
    if tag != _OK:
        return  # the host gives every taskunit the import's error
    while True:
        unit = read_frame()
        if unit is None:
            return
        (t, payload), printed = captured(lambda: process(loaded, unit))
        answer(t, payload, printed)


_native_main()


# antnest's native Python loop: the worker's own CPython, under
# bubblewrap, running one Python job's taskunits one after another (see
# `native.rs`). Appended to `antnest_job.py`'s text and run with
# `python3 -c`, so nothing is written to disk and nothing can shadow it.
#
# On stdin, frames of a u32 LE length and that many bytes: the job's
# files first (answered once the job is imported; the process ends if
# it cannot be), then one taskunit per frame. Run with the argument
# `combine`, the frames after the files are the job's results in order,
# up to a length of 0xFFFFFFFF (the end), and the one answer is the
# combine's output (tag 3: the job has no combine). Run with `split`, the
# process asks for the input (tag 4, the most bytes it wants, answered by
# a frame: empty at the input's end), sends each taskunit as it is made
# (tag 5), and ends with tag 0 (tag 3: the host splits the input). Each answer on the original stdout: a tag byte (0 result, 1 job
# error, 2 out of memory), the payload's length and the captured output's
# length (u32 LE each), the payload, then what the call printed. What the
# job prints goes to that capture, and anything written to the process's
# own stdout goes to its stderr, so nothing but answers reaches the host.

import os as _os
import struct as _struct
import time as _time

_OK, _ERROR, _NO_MEMORY, _NOT_HERE, _READ, _EMIT = 0, 1, 2, 3, 4, 5
# A frame length that ends the results, in `combine` mode.
_END = 0xFFFFFFFF
# An answer's head: its tag, the payload's length, the captured output's.
_HEAD = _struct.Struct("<BII")
# Answers wait to be written out together until no taskunit is left to
# work on, or one took this long (seconds).
_FLUSH_AFTER = 0.001
# The most a taskunit's captured output may be; the host caps it too.
_CAPTURE_MAX = 64 << 10


def _native_main():
    answers = _os.fdopen(_os.dup(1), "wb")
    _os.dup2(2, 1)

    # What was read of stdin and not taken yet is `pending[taken:]`.
    pending = bytearray()
    taken = 0

    def read_frame():
        # The host sends several taskunits ahead: the answers are written
        # out (flushed) only when no whole frame is left to work on, just
        # before waiting for more, so a run of small taskunits costs one
        # write and one read for many.
        nonlocal pending, taken
        while True:
            have = len(pending) - taken
            if have >= 4:
                n = int.from_bytes(pending[taken : taken + 4], "little")
                if n == _END:
                    taken += 4
                    return None
                if have >= 4 + n:
                    with memoryview(pending) as view:
                        data = bytes(view[taken + 4 : taken + 4 + n])
                    taken += 4 + n
                    return data
                want = 4 + n - have
            else:
                want = 4 - have
            answers.flush()
            del pending[:taken]
            taken = 0
            chunk = _os.read(0, max(want, 1 << 16))
            if not chunk:
                return None
            pending += chunk

    def answer(tag, payload=b"", printed=""):
        # `answers` is buffered: it leaves when `read_frame` waits.
        printed = printed.encode("utf-8", "replace")[:_CAPTURE_MAX] if printed else b""
        answers.write(_HEAD.pack(tag, len(payload), len(printed)))
        answers.write(payload)
        answers.write(printed)

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
        answers.flush()
        return  # the host gives every taskunit the import's error
    if sys.argv[1:] == ["combine"]:
        output = []

        def combined():
            if not combine(loaded, read_frame, output.append):
                return None
            return b"".join(output)

        (tag, payload), printed = captured(combined)
        if tag == _OK and payload is None:
            answer(_NOT_HERE)
        else:
            answer(tag, payload, printed)
        answers.flush()
        return
    if sys.argv[1:] == ["split"]:

        def read_input(n):
            answer(_READ, n.to_bytes(4, "little"))
            return read_frame() or b""

        def emit(unit):
            answer(_EMIT, unit)

        (tag, emitted), printed = captured(lambda: split(loaded, read_input, emit))
        if tag == _OK:
            answer(_OK if emitted else _NOT_HERE, b"", printed)
        else:
            answer(tag, emitted, printed)
        answers.flush()
        return
    clock = _time.perf_counter
    while True:
        unit = read_frame()
        if unit is None:
            return
        started = clock()
        (t, payload), printed = captured(lambda: process(loaded, unit))
        answer(t, payload, printed)
        # A taskunit that took a while is not worth holding answers for:
        # they go now, and the host's wait for each stays short.
        if clock() - started >= _FLUSH_AFTER:
            answers.flush()


_native_main()

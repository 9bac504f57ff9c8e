"""Numbers through `phonenumbers` itself, one by one, on every core.

`phonenumbers` is pure Python, ~30-50 µs a number on one core: the numbers of a first run that
are not in E.164 form (national formats, spaces; ~6 % of a 10,000,000-row audience) took ~33 s
of its ~48 s (bench/results_policy.md). `classify_all` shares a large list between helper
processes, one per core, a chunk at a time. A helper is `python -m
cdp_activation.phone_parsing`, fed JSON lines on stdin: this module imports nothing but
`phonenumbers` (~30 ms, ~11 MB), and a plain subprocess works where `multiprocessing` does not
(a Celery worker's daemonic processes may not have children) and never imports the parent's
`__main__`. A helper that fails, for any reason, gives its chunk back to the others, and what
none could parse is parsed in this process: the answers are the same either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import phonenumbers
from phonenumbers import PhoneNumberType
from phonenumbers.phonenumberutil import REGION_CODE_FOR_NON_GEO_ENTITY  # type: ignore[attr-defined]

STATUS_OK = "ok"
STATUS_MISSING = "missing"
STATUS_INVALID = "invalid"

Answer = tuple[str | None, str, str | None]  # (E.164, status, type)
Pair = tuple[str | None, str | None]  # (raw, region)

_TYPE_NAME = {
    value: name.lower()
    for name, value in vars(PhoneNumberType).items()
    if name.isupper() and isinstance(value, int)
}
# Below this many numbers (~1 s on one core) a helper's start and the JSON both ways cost more
# than they save.
PARALLEL_MIN = 20_000


def classify(raw: str | None, region: str | None) -> Answer:
    """(E.164, status, type) for one raw number, straight from `phonenumbers`.

    `region` is the default for national formats. Strip, a leading "00" means "+", blank is
    missing: the reference every faster path is measured against.
    """
    if raw is None or not raw.strip():
        return None, STATUS_MISSING, None
    text = raw.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, (region or "").upper() or None)
    except phonenumbers.NumberParseException:
        return None, STATUS_INVALID, None
    # `is_valid_number` is `number_type` != UNKNOWN in the number's own region, whose calling
    # code must be the number's: said here with the type's patterns tried once, not twice
    # (the region is still looked up twice, as `number_type` does it itself).
    kind = phonenumbers.number_type(number)
    if kind == PhoneNumberType.UNKNOWN:
        return None, STATUS_INVALID, None
    home = phonenumbers.region_code_for_number(number)
    if home is None or (
        home != REGION_CODE_FOR_NON_GEO_ENTITY
        and number.country_code != phonenumbers.country_code_for_valid_region(home)
    ):
        return None, STATUS_INVALID, None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return e164, STATUS_OK, _TYPE_NAME[kind]


def cores() -> int:
    """The cores this process may use: those it may run on, fewer if a CPU quota (a container's
    `--cpus`, a Kubernetes limit: cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`) allows less."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(usable, quota)) if quota is not None else usable


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole CPUs the cgroup's quota allows (rounded up), None without a quota."""
    candidates = (
        (root / "cpu.max", None),
        (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"),
    )
    for first, second in candidates:
        try:
            fields = first.read_text().split()
            if second is not None:
                fields.append(second.read_text().strip())
        except OSError:
            continue
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
        return -(-quota // period) if quota > 0 and period > 0 else None
    return None


MAX_HELPERS = 8  # beyond this, the feeding threads and the JSON are the bottleneck
ANSWER_WITHIN = 60.0  # seconds for a helper to answer one chunk (~0.15 s of work)
log = logging.getLogger(__name__)


def classify_all(pairs: Sequence[Pair], workers: int | None = None) -> list[Answer]:
    """`classify` of each pair, in order; by `workers` helper processes (default: one per
    core, at most `MAX_HELPERS`) when there are at least `PARALLEL_MIN` pairs.

    The pairs go in chunks of `_CHUNK` to whichever helper is free next. This process only
    feeds them: parsing here as well made the threads that feed the helpers wait for the GIL,
    and the helpers for them (180,000 numbers: 2.6 s, against 2.4 s with two helpers and
    3.8 s in this process alone). What no helper could parse is parsed here at the end. If
    this thread is interrupted (a step stopped, a task's time limit), the helpers are given
    no more chunks and stop."""
    workers = min(cores(), MAX_HELPERS) if workers is None else workers
    if workers <= 1 or len(pairs) < PARALLEL_MIN:
        return [classify(raw, region) for raw, region in pairs]
    chunks = [pairs[start : start + _CHUNK] for start in range(0, len(pairs), _CHUNK)]
    answers: list[list[Answer] | None] = [None] * len(chunks)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(chunks)):
        todo.put(index)
    stop = threading.Event()
    failures: list[str] = []
    helpers = [
        threading.Thread(target=_helper, args=(chunks, answers, todo, stop, failures), daemon=True)
        for _ in range(min(workers, len(chunks)))
    ]
    try:
        for helper in helpers:
            helper.start()
        for helper in helpers:
            helper.join()
    finally:
        stop.set()
    left = [index for index, answer in enumerate(answers) if answer is None]
    if failures:
        log.warning(
            "phone numbers: %d of %d helper processes failed (%s); %d of %d chunks parsed "
            "in this process instead",
            len(failures),
            len(helpers),
            failures[0],
            len(left),
            len(chunks),
        )
    for index in left:
        answers[index] = [classify(raw, region) for raw, region in chunks[index]]
    return [answer for chunk in answers if chunk is not None for answer in chunk]


_CHUNK = 4_000  # pairs handed out at a time: ~0.15 s of parsing


def _next(todo: queue.SimpleQueue[int], stop: threading.Event) -> int | None:
    if stop.is_set():
        return None
    try:
        return todo.get_nowait()
    except queue.Empty:
        return None


def _helper(
    chunks: Sequence[Sequence[Pair]],
    answers: list[list[Answer] | None],
    todo: queue.SimpleQueue[int],
    stop: threading.Event,
    failures: list[str],
) -> None:
    """Feed one helper process chunk after chunk until none is left (or `stop`). A helper
    that cannot start, fails, exits, or answers nothing within `ANSWER_WITHIN` is killed, its
    chunk given back and the failure noted: nothing waits on a helper forever.

    The pipes are read and written without blocking, under that deadline: a helper that
    stops reading would otherwise hold a write to its full pipe for good (seen under a
    profiler that stops processes to sample them)."""
    # The helper imports what this process would: the same phonenumbers, whose version the
    # cache stamps its answers with.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "cdp_activation.phone_parsing"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
    except Exception as err:  # any failure to start leaves the work to the others
        failures.append(_reason(err))
        return
    assert process.stdin is not None and process.stdout is not None
    to_helper, from_helper = process.stdin.fileno(), process.stdout.fileno()
    os.set_blocking(to_helper, False)
    os.set_blocking(from_helper, False)
    index, failed = None, False
    try:
        while (index := _next(todo, stop)) is not None:
            deadline = time.monotonic() + ANSWER_WITHIN
            _send(to_helper, json.dumps(chunks[index]).encode() + b"\n", deadline)
            got = json.loads(_receive(from_helper, deadline))
            if not isinstance(got, list) or len(got) != len(chunks[index]):
                raise ValueError("a helper answered for another number of pairs")
            answers[index] = [(e164, status, kind) for e164, status, kind in got]
            index = None
    except Exception as err:  # whatever went wrong, the chunk is parsed elsewhere
        failed = True
        failures.append(_reason(err))
        if index is not None:
            todo.put(index)
    finally:
        with contextlib.suppress(OSError):  # closed: a helper still there reads its end
            process.stdin.close()
        if failed:
            process.kill()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def _reason(err: BaseException) -> str:
    """A failure in one line, for the log (never a number: no error here quotes the data)."""
    return f"{type(err).__name__}: {err}"[:200]


def _wait(fd: int, event: int, deadline: float, what: str) -> None:
    """Until `fd` is ready for `event` (poll: any descriptor number), or TimeoutError."""
    poller = select.poll()
    poller.register(fd, event)
    left = deadline - time.monotonic()
    if left <= 0 or not poller.poll(left * 1000):
        raise TimeoutError(what)


def _send(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        _wait(fd, select.POLLOUT, deadline, "a phone helper stopped reading")
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue


def _receive(fd: int, deadline: float) -> bytes:
    """One line (the helper writes nothing after it until it is sent more)."""
    parts: list[bytes] = []
    while True:
        _wait(fd, select.POLLIN, deadline, "a phone helper did not answer in time")
        try:
            part = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not part:
            raise OSError("a phone helper exited without answering")
        parts.append(part)
        if part.endswith(b"\n"):
            return b"".join(parts)


def _serve() -> None:
    """A helper: one JSON array of [raw, region] pairs a line on stdin, the array of their
    [e164, status, type] answers a line on stdout. Plain reads and writes of the pipes'
    descriptors, each partial one carried on: no buffered layer in between."""
    pending = b""
    while part := os.read(0, 1 << 16):
        pending += part
        while (end := pending.find(b"\n")) >= 0:
            line, pending = pending[:end], pending[end + 1 :]
            pairs = json.loads(line)
            answer = memoryview(json.dumps([classify(r, g) for r, g in pairs]).encode() + b"\n")
            while answer:
                answer = answer[os.write(1, answer) :]


if __name__ == "__main__":
    _serve()

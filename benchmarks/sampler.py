"""Sampling profilers for code whose timing a tracing profiler would change.

cProfile slows every Python call several times over. In the ingest that shifts the
race between the fetch loop and the server, so fetches come back nearly empty and the
profile describes a different program. `StackSampler` requests a SIGALRM from the
kernel every `interval_s` of wall-clock time (setitimer). Python runs the handler in
the main thread between two bytecodes, or right after a blocking call such as epoll is
interrupted, and the handler counts the functions on the interrupted stack. Time spent
waiting therefore shows up as the function that waits (selectors.py:select), not as
missing samples.

`ThreadSampler` is for processes whose main thread another library drives, such as a
Ray actor's worker: a thread of its own reads the main thread's stack every
`interval_s`. It runs only when it holds the GIL, so a sample waits while the main
thread runs Python, until the interpreter switches threads (every 5 ms by default).

NOTE: a C call that holds the GIL (a large msgspec decode) delays both samplers until it
returns, so its time is counted for the Python line after it, in the same function.
"""

from __future__ import annotations

import signal
import sys
import sysconfig
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, cast

__all__ = [
    "Hotspot",
    "SampleCounts",
    "StackSampler",
    "ThreadSampler",
    "short_path",
    "start_actor_sampler",
    "stop_actor_sampler",
]

# Site-packages first: the virtual environment may sit inside the repository.
_PREFIXES = (
    sysconfig.get_paths()["purelib"] + "/",
    sysconfig.get_paths()["platlib"] + "/",
    sysconfig.get_paths()["stdlib"] + "/",
    str(Path(__file__).resolve().parents[1]) + "/",
)


@dataclass(frozen=True)
class Hotspot:
    function: str
    self_share: float
    """Share of samples with this function innermost, in its own code or a C call."""
    total_share: float
    """Share of samples with this function anywhere on the stack."""


@dataclass
class SampleCounts:
    """Samples of one thread's stack: per function, innermost and anywhere."""

    samples: int = 0
    innermost: Counter[str] = field(default_factory=Counter)
    anywhere: Counter[str] = field(default_factory=Counter)

    def record(self, frame: FrameType) -> None:
        self.samples += 1
        self.innermost[_name(frame)] += 1
        seen: set[str] = set()
        current: FrameType | None = frame
        while current is not None:
            name = _name(current)
            if name not in seen:
                seen.add(name)
                self.anywhere[name] += 1
            current = current.f_back

    def add(self, other: SampleCounts) -> None:
        """Add the samples of another thread, such as another actor's."""
        self.samples += other.samples
        self.innermost.update(other.innermost)
        self.anywhere.update(other.anywhere)

    def top(self, count: int = 10, *, by: str = "self") -> list[Hotspot]:
        """Return the `count` functions with the most samples, innermost or anywhere."""
        counter = self.innermost if by == "self" else self.anywhere
        total = max(self.samples, 1)
        return [
            Hotspot(name, self.innermost[name] / total, self.anywhere[name] / total)
            for name, _ in counter.most_common(count)
        ]

    def share(self, function: str) -> float:
        """Return the share of samples with `function` anywhere on the stack."""
        return self.anywhere[function] / max(self.samples, 1)


@dataclass
class StackSampler:
    """Sample the main thread's stack while the `with` block runs; main thread only."""

    interval_s: float = 0.002
    counts: SampleCounts = field(default_factory=SampleCounts)
    _previous: Any = None

    @property
    def samples(self) -> int:
        return self.counts.samples

    def __enter__(self) -> StackSampler:
        self._previous = signal.signal(signal.SIGALRM, self._handle)
        signal.setitimer(signal.ITIMER_REAL, self.interval_s, self.interval_s)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if frame is not None:
            self.counts.record(frame)

    def top(self, count: int = 10, *, by: str = "self") -> list[Hotspot]:
        return self.counts.top(count, by=by)

    def share(self, function: str) -> float:
        return self.counts.share(function)


class ThreadSampler:
    """Sample the main thread's stack from a thread of its own, until `stop`."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.counts = SampleCounts()
        # The main thread has run since the interpreter started, so it has an ident.
        self._target = cast(int, threading.main_thread().ident)
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="plantstream-sampler", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> SampleCounts:
        """Stop sampling and return the counts."""
        self._stopped.set()
        self._thread.join()
        return self.counts

    def _run(self) -> None:
        # Event.wait rather than time.sleep, so that stop() ends the wait at once.
        while not self._stopped.wait(self.interval_s):
            frame = sys._current_frames().get(self._target)
            if frame is not None:
                self.counts.record(frame)


_ACTOR_SAMPLER: ThreadSampler | None = None
"""The sampler running in this process, which `stop_actor_sampler` stops."""


def start_actor_sampler(actor: object) -> None:
    """Start a ThreadSampler in an actor's process; run it with `__ray_call__`."""
    global _ACTOR_SAMPLER
    _ACTOR_SAMPLER = ThreadSampler()
    _ACTOR_SAMPLER.start()


def stop_actor_sampler(actor: object) -> SampleCounts:
    """Stop the sampler `start_actor_sampler` started and return its counts."""
    global _ACTOR_SAMPLER
    if _ACTOR_SAMPLER is None:
        raise RuntimeError(
            "no sampler runs in this actor; call start_actor_sampler through "
            "__ray_call__ first"
        )
    sampler, _ACTOR_SAMPLER = _ACTOR_SAMPLER, None
    return sampler.stop()


def _name(frame: FrameType) -> str:
    code = frame.f_code
    return f"{short_path(code.co_filename)}:{code.co_name}"


def short_path(path: str) -> str:
    """Return `path` relative to site-packages, the stdlib or the repository."""
    # Keep the import path: .../site-packages/nats/js/client.py -> nats/js/client.py.
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path

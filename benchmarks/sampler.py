"""A sampling profiler for code whose timing a tracing profiler would change.

cProfile slows every Python call several times over. In the ingest that shifts the
race between the fetch loop and the server, so fetches come back nearly empty and the
profile describes a different program. This profiler requests a SIGALRM from the
kernel every `interval_s` of wall-clock time (setitimer). Python runs the handler in
the main thread between two bytecodes, or right after a blocking call such as epoll is
interrupted, and the handler counts the functions on the interrupted stack. Time spent
waiting therefore shows up as the function that waits (selectors.py:select), not as
missing samples.

NOTE: a C call that holds the GIL (a large msgspec decode) delays the handler until it
returns, so its time is counted for the Python line after it, in the same function.
"""

from __future__ import annotations

import signal
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["Hotspot", "StackSampler", "short_path"]

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
class StackSampler:
    """Sample the main thread's stack while the `with` block runs; main thread only."""

    interval_s: float = 0.002
    samples: int = 0
    _self: Counter[str] = field(default_factory=Counter)
    _total: Counter[str] = field(default_factory=Counter)
    _previous: Any = None

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
        if frame is None:
            return
        self.samples += 1
        self._self[_name(frame)] += 1
        seen: set[str] = set()
        current: FrameType | None = frame
        while current is not None:
            name = _name(current)
            if name not in seen:
                seen.add(name)
                self._total[name] += 1
            current = current.f_back

    def top(self, count: int = 10, *, by: str = "self") -> list[Hotspot]:
        """Return the `count` functions with the most samples, innermost or anywhere."""
        counter = self._self if by == "self" else self._total
        total = max(self.samples, 1)
        return [
            Hotspot(name, self._self[name] / total, self._total[name] / total)
            for name, _ in counter.most_common(count)
        ]

    def share(self, function: str) -> float:
        """Return the share of samples with `function` anywhere on the stack."""
        return self._total[function] / max(self.samples, 1)


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

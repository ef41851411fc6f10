"""CPU time per process over one pipeline run: where the two cores go.

The pipeline runs as several processes on the same cores: the driver (the ingest loop
and the DuckDB writer thread), one process per partition actor, nats-server and Ray's
own daemons. Reading each one's user and system time from /proc before and after a
run gives the CPU each spends per event, and their sum bounds the rate the cores
allow. Only the driver and the processes it started count: the suite starts Ray and
nats-server from the driver, and anything else on the machine is not the pipeline's.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import ray

from benchmarks.broker import Broker
from benchmarks.pipeline_run import PipelineRun, run_pipeline

logger = logging.getLogger(__name__)

__all__ = [
    "CpuShare",
    "CpuSplit",
    "measure_cpu_split",
    "process_cpu_seconds",
    "process_tree_cpu_seconds",
]

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

MIN_SHARE = 0.01
"""Processes with less than this share of the run's CPU time are summed in one row."""

SMALL_PROCESSES = "other processes, each under 1%"
"""The label of the row that sums the processes below MIN_SHARE."""


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # The command name in parentheses may contain spaces, so split after it.
        return stat.read().rsplit(")", 1)[1].split()


def process_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds `pid` has used, from /proc/<pid>/stat."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as comm:
            return comm.read().strip()
    except OSError:
        return f"pid {pid}"


def process_tree_cpu_seconds(root: int) -> dict[int, float]:
    """Return the CPU seconds of `root` and of every process descended from it."""
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat_fields(int(entry))
            except (OSError, IndexError, ValueError):
                continue  # the process ended while the list was read
            parents[int(entry)] = int(fields[1])
            seconds[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICKS_PER_S
    in_tree: dict[int, bool] = {root: True}

    def descends(pid: int) -> bool:
        chain = []
        while pid not in in_tree:
            chain.append(pid)
            parent = parents.get(pid, 0)
            if parent <= 1:
                in_tree[pid] = False
                break
            pid = parent
        found = in_tree[pid]
        for link in chain:
            in_tree[link] = found
        return found

    return {pid: value for pid, value in seconds.items() if descends(pid)}


@dataclass(frozen=True)
class CpuShare:
    process: str
    cpu_seconds: float
    us_per_event: float


@dataclass(frozen=True)
class CpuSplit:
    run: PipelineRun
    shares: list[CpuShare]

    @property
    def us_per_event(self) -> float:
        return sum(share.us_per_event for share in self.shares)


async def measure_cpu_split(broker: Broker, partitions: int) -> CpuSplit:
    """Run the pipeline once and return the CPU time of each process per event."""
    before: dict[int, float] = {}
    after: dict[int, float] = {}
    actor_pids: list[int] = []

    async def watch(actors: list[ray.actor.ActorHandle]) -> None:
        actor_pids.extend(
            await asyncio.gather(*(actor.pid.remote() for actor in actors))
        )
        before.update(process_tree_cpu_seconds(os.getpid()))
        try:
            await asyncio.Event().wait()
        finally:
            # Cancelled once the stream is drained, before the actors are killed.
            after.update(process_tree_cpu_seconds(os.getpid()))

    run = await run_pipeline(broker, partitions, during=watch)
    labels = {os.getpid(): "driver (ingest loop and DuckDB writer)"}
    labels.update(
        {pid: f"partition actor {index}" for index, pid in enumerate(actor_pids)}
    )
    server_pid = broker.server.pid
    if server_pid is not None:
        labels[server_pid] = "nats-server"
    used = {pid: after[pid] - before[pid] for pid in after.keys() & before.keys()}
    total = sum(used.values()) or 1.0
    shares: list[CpuShare] = []
    small = 0.0
    for pid, seconds in sorted(used.items(), key=lambda item: -item[1]):
        if pid not in labels and seconds / total < MIN_SHARE:
            small += seconds
            continue
        # Every other process the driver started is one of Ray's (raylet, GCS,
        # dashboard and log daemons, idle workers).
        label = labels.get(pid) or f"Ray's {_process_name(pid)} (pid {pid})"
        shares.append(CpuShare(label, seconds, seconds / run.events * 1e6))
    if small:
        # Summed rather than dropped, so that the total is the whole tree's.
        shares.append(CpuShare(SMALL_PROCESSES, small, small / run.events * 1e6))
    logger.info(
        "cpu split: %s",
        ", ".join(f"{s.process} {s.us_per_event:.1f} us/event" for s in shares),
    )
    return CpuSplit(run, shares)

"""Everything one suite run measured, as the report writer reads it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from actors.settings import StateSettings
from benchmarks.cpu import CpuSplit
from benchmarks.latency import LatencyRun
from benchmarks.memory import AllocationSite, RssTrace
from benchmarks.pipeline_run import PipelineRun
from benchmarks.profiling import DriverProfile, FunctionShare
from benchmarks.stats import Figure

__all__ = ["GrowthRow", "Results", "Sizes"]


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark does; the quick mode scales everything down."""

    mode: str
    repeats: int
    events: int
    """Generated messages of the main workload (one event per message)."""
    partitions: tuple[int, ...]
    naive_events: int
    latency_seconds: float
    latency_repeats: int
    id_count: int
    order_count: int
    soak_events: int
    soak_interval_s: float
    growth_events: int
    open_orders: tuple[int, ...]
    plants: tuple[int, ...]
    remembered_ids: tuple[int, ...] = ()
    """Id table preloads of the growth runs; empty in results saved before them."""


@dataclass
class GrowthRow:
    label: str
    rate: Figure
    """Events per second."""
    memory_bytes: int | None = None
    checkpoint_bytes: int | None = None
    checkpoint_seconds: Figure | None = None
    """A base checkpoint: the state with every order."""
    delta_bytes: int | None = None
    delta_seconds: Figure | None = None
    """A delta checkpoint: the state with the orders changed since the base."""
    pipeline_rate: Figure | None = None
    """End to end, events per second, where measured."""


@dataclass
class Results:
    sizes: Sizes
    command: str
    started_at: dt.datetime
    machine: dict[str, str]
    versions: dict[str, str]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    duration_s: float = 0.0
    workload: dict[str, int] = field(default_factory=dict)
    ceiling: Figure | None = None
    pipeline: dict[int, Figure] = field(default_factory=dict)
    pipeline_runs: list[PipelineRun] = field(default_factory=list)
    without_sink: Figure | None = None
    """The pipeline at `without_sink_partitions` with no DuckDB writes; None in
    results saved before it was measured."""
    without_sink_partitions: int = 2
    edge_supported: bool = False
    edge_ceiling: Figure | None = None
    edge_pipeline: dict[int, Figure] = field(default_factory=dict)
    edge_without_sink: Figure | None = None
    edge_note: str = ""
    naive: Figure | None = None
    naive_partitions: int = 2
    state_rate: Figure | None = None
    state_rate_arrow: Figure | None = None
    """PartitionState in memory including the Arrow snapshot, which the peer lacks."""
    state_postings: int = 0
    bytewax: Figure | None = None
    bytewax_postings: int = 0
    bytewax_version: str | None = None
    latency_max_rate: float = 0.0
    latency_partitions: int = 2
    latency: dict[float, list[LatencyRun]] = field(default_factory=dict)
    per_id: Figure | None = None
    per_order: Figure | None = None
    per_order_with_id: Figure | None = None
    order_sites: list[AllocationSite] = field(default_factory=list)
    soak: PipelineRun | None = None
    soak_trace: RssTrace | None = None
    soak_driver_pid: int = 0
    soak_settings: StateSettings | None = None
    """Actor settings of the soak run; None in results saved before they were kept."""
    growth_orders: list[GrowthRow] = field(default_factory=list)
    growth_plants: list[GrowthRow] = field(default_factory=list)
    driver_profile: DriverProfile | None = None
    cpu_split: CpuSplit | None = None
    """CPU time per process over one run, one event per message."""
    edge_cpu_split: CpuSplit | None = None
    """The same with edge batches."""
    state_profile: list[FunctionShare] = field(default_factory=list)
    commit: str = ""
    """The git commit measured (`benchmarks.machine.source_commit`); empty in results
    saved before it was recorded."""

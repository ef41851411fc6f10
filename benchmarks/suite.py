"""Run every benchmark and write the report: `python -m benchmarks.suite --output FILE`.

Everything runs on this machine: a nats-server the suite starts on loopback for each
wire mode, and a local Ray instance. The full mode repeats each figure 3 times and takes
about 15 minutes on 2 cores. `--quick` runs each once on small inputs in about a minute,
so it only checks that every benchmark works.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ray

import pipeline.ingest
from actors.settings import StateSettings
from benchmarks import growth, memory
from benchmarks.broker import Broker
from benchmarks.ceiling import run_ceiling
from benchmarks.cpu import measure_cpu_split
from benchmarks.in_memory import partition_state_rate
from benchmarks.interrupt import SigtermAsInterrupt
from benchmarks.latency import run_latency
from benchmarks.machine import machine_info, software_versions, source_commit
from benchmarks.naive import run_naive
from benchmarks.peer_bytewax import bytewax_available, bytewax_rate, bytewax_version
from benchmarks.pipeline_run import BENCH_SETTINGS, run_pipeline
from benchmarks.profiling import profile_driver, profile_state
from benchmarks.report import write_report
from benchmarks.results import GrowthRow, Results, Sizes
from benchmarks.stats import Figure, summarize
from benchmarks.workload import (
    EDGE_BATCH_EVENTS,
    build_workload,
    edge_batches,
    publish_messages,
    spec_for,
)
from cluster.cli import add_log_level_option
from cluster.job import connect_ray

logger = logging.getLogger(__name__)

__all__ = [
    "FULL",
    "QUICK",
    "build_parser",
    "main",
    "run_suite",
    "save_and_write_report",
]

FULL = Sizes(
    mode="full",
    repeats=3,
    events=150_000,
    partitions=(1, 2, 4, 8),
    naive_events=3_000,
    latency_seconds=10.0,
    latency_repeats=3,
    id_count=1_000_000,
    order_count=50_000,
    soak_events=1_500_000,
    # Eight samples per 2 s checkpoint interval. Sampled once a second, every other
    # sample fell in a checkpoint's swing, and the median of a third could land on
    # either side of it.
    soak_interval_s=0.25,
    growth_events=30_000,
    open_orders=(1_000, 10_000, 100_000),
    plants=(3, 30, 300),
    remembered_ids=(2_000_000,),
)

QUICK = Sizes(
    mode="quick",
    repeats=1,
    events=5_000,
    partitions=(1, 2, 4, 8),
    naive_events=200,
    latency_seconds=1.5,
    latency_repeats=1,
    id_count=50_000,
    order_count=2_000,
    soak_events=5_000,
    soak_interval_s=0.2,
    growth_events=2_000,
    open_orders=(100, 1_000, 10_000),
    plants=(3, 30, 300),
    remembered_ids=(20_000,),
)

SAVED_RESULTS_HINT = "make bench writes out/bench-results.pickle"

SOAK_STATE = StateSettings(dedup_max_ids=50_000, closed_order_retention_s=6 * 3600.0)
"""Actor settings of the soak run, sized so that memory reaches its steady state early.

The full soak stream (1,500,000 messages over 30 plants) spans about 65 days of
event time and gives each of its 2 partitions about 750,000 event ids. 50,000 ids fill
the id table within the first fifteenth of the run. A generated order finishes within a
few hours of its release, so a 6-hour retention starts evicting within the first day
of event time. Orders under a hold that the stream never releases are kept, about 2
per 1,000 messages, so the state still grows slowly. With the defaults the id table
would still be filling at the end (750,000 of 2,000,000 ids per partition), so memory
would grow for the whole run."""

LATENCY_SHARES = (0.25, 0.50, 0.80)
"""Publish rates for the latency runs, as shares of the best end-to-end throughput."""


def edge_batches_supported() -> bool:
    """Return whether the ingest reads edge batches (plant.events.<plant>.batch)."""
    return hasattr(pipeline.ingest, "EDGE_BATCH_SUFFIX")


async def _throughput(results: Results, sizes: Sizes) -> None:
    workload = build_workload(spec_for(sizes.events))
    results.workload = {
        "messages": workload.events,
        "plants": workload.spec.plants,
        "orders": workload.spec.plants * workload.spec.orders_per_plant,
    }
    logger.info("one event per message: %d messages", workload.events)
    async with Broker() as broker:
        await publish_messages(broker.client, workload.messages)
        # Each repeat runs the ceiling and then the pipeline at every partition
        # count. The machine's speed has moved by a third within an hour, and this
        # way such a change shifts both alike.
        ceiling: list[float] = []
        rates: dict[int, list[float]] = {p: [] for p in sizes.partitions}
        without_sink: list[float] = []
        for _ in range(sizes.repeats):
            events, seconds = await run_ceiling(
                broker.client,
                workload.events,
                BENCH_SETTINGS.fetch_batch,
                edge_batches=False,
            )
            ceiling.append(events / seconds)
            for partitions in sizes.partitions:
                run = await run_pipeline(broker, partitions)
                results.pipeline_runs.append(run)
                rates[partitions].append(run.rate)
            run = await run_pipeline(
                broker, results.without_sink_partitions, sink=False
            )
            without_sink.append(run.rate)
        results.ceiling = summarize(ceiling)
        results.pipeline = {p: summarize(r) for p, r in rates.items()}
        results.without_sink = summarize(without_sink)
        naive = []
        for _ in range(sizes.repeats):
            events, seconds = await run_naive(
                broker, sizes.naive_events, results.naive_partitions
            )
            naive.append(events / seconds)
        results.naive = summarize(naive)
        results.driver_profile = await profile_driver(broker, 2)
        results.cpu_split = await measure_cpu_split(broker, 2)

    results.state_profile = profile_state(workload.messages)
    state, state_arrow, peer = [], [], []
    for _ in range(sizes.repeats):
        events, seconds, results.state_postings = partition_state_rate(
            workload.messages
        )
        state.append(events / seconds)
        events, seconds, _ = partition_state_rate(workload.messages, arrow=True)
        state_arrow.append(events / seconds)
        if bytewax_available():
            events, seconds, results.bytewax_postings = bytewax_rate(workload.messages)
            peer.append(events / seconds)
    results.state_rate = summarize(state)
    results.state_rate_arrow = summarize(state_arrow)
    results.bytewax_version = bytewax_version()
    results.bytewax = summarize(peer) if peer else None

    await _edge(results, sizes, workload.messages)


async def _edge(
    results: Results, sizes: Sizes, messages: list[tuple[str, bytes]]
) -> None:
    batches = edge_batches(messages, EDGE_BATCH_EVENTS)
    events = sum(count for _, _, count in batches)
    results.workload["edge_messages"] = len(batches)
    results.workload["edge_events"] = events
    results.edge_supported = edge_batches_supported()
    async with Broker() as broker:
        await publish_messages(broker.client, ((s, d) for s, d, _ in batches))
        # Alternated like the runs with one event per message.
        ceiling: list[float] = []
        rates: dict[int, list[float]] = {p: [] for p in sizes.partitions}
        without_sink: list[float] = []
        for _ in range(sizes.repeats):
            decoded, seconds = await run_ceiling(
                broker.client,
                len(batches),
                BENCH_SETTINGS.fetch_batch,
                edge_batches=True,
            )
            ceiling.append(decoded / seconds)
            if not results.edge_supported:
                continue
            for partitions in sizes.partitions:
                run = await run_pipeline(broker, partitions)
                rates[partitions].append(run.rate)
            run = await run_pipeline(
                broker, results.without_sink_partitions, sink=False
            )
            without_sink.append(run.rate)
        results.edge_ceiling = summarize(ceiling)
        if not results.edge_supported:
            results.edge_note = (
                "not yet supported: pipeline.ingest has no edge-batch handling "
                "(EDGE_BATCH_SUFFIX), so only the ceiling was measured"
            )
            return
        results.edge_pipeline = {p: summarize(r) for p, r in rates.items()}
        results.edge_without_sink = summarize(without_sink)
        results.edge_cpu_split = await measure_cpu_split(broker, 2)


async def _latency(results: Results, sizes: Sizes) -> None:
    best = max(results.pipeline, key=lambda p: results.pipeline[p].median)
    results.latency_partitions = best
    results.latency_max_rate = results.pipeline[best].median
    for share in LATENCY_SHARES:
        rate = share * results.latency_max_rate
        runs = []
        for _ in range(sizes.latency_repeats):
            runs.append(await run_latency(rate, sizes.latency_seconds, best))
        results.latency[share] = runs


async def _memory(results: Results, sizes: Sizes) -> None:
    per_id, per_order, with_id = [], [], []
    for repeat in range(sizes.repeats):
        per_id.append(memory.bytes_per_event_id(sizes.id_count))
        sites = results.order_sites if repeat == 0 else None
        order, order_with_id = memory.bytes_per_open_order(sizes.order_count, sites)
        per_order.append(order)
        with_id.append(order_with_id)
    results.per_id = summarize(per_id)
    results.per_order = summarize(per_order)
    results.per_order_with_id = summarize(with_id)

    workload = build_workload(spec_for(sizes.soak_events, plants=30, seed=23))
    results.workload["soak_messages"] = workload.events
    trace = memory.RssTrace()
    async with Broker() as broker:
        await publish_messages(broker.client, workload.messages)
        del workload
        results.soak = await run_pipeline(
            broker,
            2,
            during=memory.sample_rss(trace, sizes.soak_interval_s),
            state=SOAK_STATE,
        )
    results.soak_trace = trace
    results.soak_settings = SOAK_STATE
    results.soak_driver_pid = os.getpid()


async def _growth(results: Results, sizes: Sizes) -> None:
    workload = build_workload(spec_for(sizes.growth_events))
    for open_orders in sizes.open_orders:
        runs = [
            growth.measure_with_open_orders(
                open_orders, workload.messages, traced=False
            )
            for _ in range(sizes.repeats)
        ]
        traced = growth.measure_with_open_orders(
            open_orders, workload.messages, traced=True
        )
        row = _growth_row(f"{open_orders:,} open orders", runs, traced)
        row.pipeline_rate = await _pipeline_after_open_orders(
            open_orders, workload.messages, sizes.repeats
        )
        results.growth_orders.append(row)
    for ids in sizes.remembered_ids:
        runs = [
            growth.measure_with_open_orders(
                0, workload.messages, traced=False, remembered_ids=ids
            )
            for _ in range(sizes.repeats)
        ]
        traced = growth.measure_with_open_orders(
            0, workload.messages, traced=True, remembered_ids=ids
        )
        results.growth_orders.append(
            _growth_row(f"{ids:,} remembered ids", runs, traced)
        )
    for plants in sizes.plants:
        plant_workload = build_workload(spec_for(sizes.growth_events, plants=plants))
        runs = [
            growth.measure_with_open_orders(0, plant_workload.messages, traced=False)
            for _ in range(sizes.repeats)
        ]
        traced = growth.measure_with_open_orders(
            0, plant_workload.messages, traced=True
        )
        pipeline_rates = []
        async with Broker() as broker:
            await publish_messages(broker.client, plant_workload.messages)
            for _ in range(sizes.repeats):
                pipeline_rates.append((await run_pipeline(broker, 2)).rate)
        row = _growth_row(
            f"{plants} plants ({plant_workload.events:,} messages)", runs, traced
        )
        row.pipeline_rate = summarize(pipeline_rates)
        results.growth_plants.append(row)


async def _pipeline_after_open_orders(
    open_orders: int, messages: list[tuple[str, bytes]], repeats: int
) -> Figure:
    """Time the pipeline over `messages` after it applied `open_orders` releases.

    Each repeat takes a new broker, because the timed messages stay in the stream
    behind the preload. The releases are those of the in-process rows, on plant P99.
    """
    preload = [
        (message.subject, message.data)
        for message in memory.open_order_messages(open_orders, plant="P99")
    ]
    rates = []
    for _ in range(repeats):
        async with Broker() as broker:
            await publish_messages(broker.client, preload)
            run = await run_pipeline(broker, 2, timed_messages=messages)
            rates.append(run.rate)
    return summarize(rates)


def _growth_row(
    label: str, runs: list[growth.GrowthRun], traced: growth.GrowthRun
) -> GrowthRow:
    """Summarise timed growth runs, with the memory of a separate traced one."""
    return GrowthRow(
        label=label,
        rate=summarize([run.rate for run in runs]),
        memory_bytes=traced.traced_bytes,
        checkpoint_bytes=runs[0].checkpoint_bytes,
        checkpoint_seconds=summarize([run.checkpoint_seconds for run in runs]),
        delta_bytes=runs[0].delta_bytes,
        delta_seconds=summarize([run.delta_seconds for run in runs]),
    )


async def run_suite(sizes: Sizes, command: str) -> Results:
    results = Results(
        sizes=sizes,
        command=command,
        started_at=dt.datetime.now(dt.UTC),
        machine=machine_info(),
        versions=software_versions(),
        load_before=os.getloadavg(),
        commit=source_commit(),
    )
    started = time.monotonic()
    connect_ray(None)
    for name, step in (
        ("throughput", _throughput),
        ("latency", _latency),
        ("memory", _memory),
        ("growth", _growth),
    ):
        logger.info("benchmark step %s started", name)
        step_started = time.monotonic()
        await step(results, sizes)
        logger.info(
            "benchmark step %s done in %.1f s", name, time.monotonic() - step_started
        )
    results.duration_s = time.monotonic() - started
    results.load_after = os.getloadavg()
    return results


PROG = "python -m benchmarks.suite"


def _path_value(text: str) -> Path:
    # An empty value would become Path("."), and the errors would name "." instead.
    if not text:
        raise argparse.ArgumentTypeError("the value is empty; name a file")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Measure plantstream's throughput, latency, memory and growth on "
        "this machine and write a Markdown report.",
    )
    parser.add_argument(
        "--output", type=_path_value, required=True, help="Markdown file to write"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one repeat of each benchmark on small inputs (about a minute)",
    )
    parser.add_argument(
        "--save-results",
        type=_path_value,
        help="also store the raw results (pickle), to render the report again later",
    )
    parser.add_argument(
        "--render-from",
        type=_path_value,
        help="write the report from results stored by --save-results; measure nothing",
    )
    add_log_level_option(parser)
    return parser


def _check_output(parser: argparse.ArgumentParser, path: Path) -> None:
    """Exit with a usage error unless `path` can be written; create no folder."""
    if path.is_dir():
        parser.error(f"{path} is a folder; name the file to write")
    blocking = next((p for p in path.parents if p.is_file()), None)
    if blocking is not None:
        parser.error(f"cannot write {path}: {blocking} is a file, not a folder")
    if path.exists():
        # Opening the file covers every cause at once: permissions, ACLs, an
        # immutable file (chattr +i, which stops root too) and a read-only mount.
        # O_APPEND without O_TRUNC leaves the contents as they are.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as error:
            parser.error(
                f"cannot write {path}: {error.strerror}; make it writable or name "
                "another file"
            )
        return
    # The file is created later, in a folder that may not exist yet, so check the
    # nearest folder that does.
    folder = next(p for p in path.parents if p.exists())
    if not os.access(folder, os.W_OK):
        parser.error(f"cannot write {path}: folder {folder} is not writable")


def _create_output_folders(
    parser: argparse.ArgumentParser, paths: Sequence[Path]
) -> None:
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"cannot create the folder of {path}: {error}")


def _read_saved_results(parser: argparse.ArgumentParser, path: Path) -> Results:
    """Load the results that --save-results stored, or exit with a usage error."""
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        parser.error(
            f"--render-from {path} {state}; pass the file that --save-results wrote "
            f"({SAVED_RESULTS_HINT})"
        )
    # Only files this suite wrote are meant here; pickle runs code from the file.
    try:
        results = pickle.loads(path.read_bytes())  # noqa: S301
    except Exception as error:
        # Bytes that are not a pickle this suite wrote fail in many ways:
        # UnpicklingError, EOFError, ImportError, IndexError among them.
        parser.error(
            f"--render-from {path} holds no results this suite saved "
            f"({type(error).__name__}: {error}); pass the file that "
            f"--save-results wrote ({SAVED_RESULTS_HINT})"
        )
    if not isinstance(results, Results):
        parser.error(
            f"--render-from {path} holds a {type(results).__name__}, not the results "
            f"this suite saves; pass the file that --save-results wrote "
            f"({SAVED_RESULTS_HINT})"
        )
    return results


def save_and_write_report(
    results: Results, output: Path, save_results: Path | None
) -> int:
    """Store `results` in `save_results`, then write the report; return the exit code.

    The results go first, so that a report that cannot be written keeps the
    measurements of a run that took minutes. Without --save-results they go to a
    temporary file in that case. Both failures are printed to stderr.
    """
    code = 0
    saved: Path | None = None
    if save_results is not None:
        try:
            save_results.write_bytes(pickle.dumps(results))
            saved = save_results
        except OSError as error:
            print(f"{PROG}: cannot write --save-results: {error}", file=sys.stderr)
            code = 1
    try:
        write_report(results, output)
    except OSError as error:
        if saved is None:
            saved = _save_to_temporary_file(results)
        print(
            f"{PROG}: cannot write the report: {error}. The results are in {saved}; "
            f"write the report again with `{PROG} --render-from {saved} --output FILE`",
            file=sys.stderr,
        )
        return 1
    return code


def _save_to_temporary_file(results: Results) -> Path:
    descriptor, name = tempfile.mkstemp(
        prefix="plantstream-bench-results-", suffix=".pickle"
    )
    with os.fdopen(descriptor, "wb") as file:
        file.write(pickle.dumps(results))
    return Path(name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    outputs = [args.output]
    if args.save_results is not None:
        outputs.append(args.save_results)
    # A full run takes minutes, so an output that cannot be written must stop it now,
    # not after the measurements.
    for path in outputs:
        if (
            args.render_from is not None
            and path.resolve() == args.render_from.resolve()
        ):
            parser.error(f"{path} is the --render-from file; write to another file")
        _check_output(parser, path)
    saved = None
    if args.render_from is not None:
        saved = _read_saved_results(parser, args.render_from)
    # Only now, so that a rejected input leaves no new folders behind.
    _create_output_folders(parser, outputs)

    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The generated stream's bad messages are dead letters by design; their warnings
    # would bury the benchmark's own log.
    logging.getLogger("pipeline.ingest").setLevel(logging.ERROR)

    if saved is not None:
        write_report(saved, args.output)
        return 0

    sizes = QUICK if args.quick else FULL
    command = " ".join([PROG, *(argv or sys.argv[1:])])
    interrupt = SigtermAsInterrupt()
    interrupt.install()
    try:
        connect_ray(None)
        # ray.init sets a SIGTERM handler of its own, which calls sys.exit.
        interrupt.install()
        results = asyncio.run(run_suite(sizes, command))
    except KeyboardInterrupt:
        # Ray is shut down first, so that the message is the last line.
        ray.shutdown()
        print(
            f"{PROG}: interrupted by {interrupt.signal.name}; no report or results "
            "were written",
            file=sys.stderr,
        )
        return interrupt.exit_code
    code = save_and_write_report(results, args.output, args.save_results)
    if code == 0:
        logger.info("wrote %s in %.0f s", args.output, results.duration_s)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

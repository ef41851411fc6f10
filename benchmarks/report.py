"""The Markdown report of one suite run: figures, targets and what bounds them."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from actors.settings import StateSettings
from benchmarks.latency import LatencyRun
from benchmarks.pipeline_run import PipelineRun
from benchmarks.profiling import RAY_TASK_LOOP
from benchmarks.results import GrowthRow, Results
from benchmarks.sampler import Hotspot
from benchmarks.stats import Figure, summarize
from benchmarks.workload import EDGE_BATCH_EVENTS

logger = logging.getLogger(__name__)

__all__ = ["SECTIONS", "render_report", "write_report"]

SECTIONS = (
    "Machine",
    "Versions",
    "Workload",
    "Targets",
    "Throughput: one event per message",
    "Throughput: edge batches",
    "Naive design",
    "Peer: Bytewax",
    "Latency",
    "Memory",
    "Growth",
    "Profile",
    "What bounds the missed targets",
)
"""Second-level headings every report has, in order."""

TARGET_CEILING_SHARE = 0.70
TARGET_NAIVE_FACTOR = 10.0
TARGET_EDGE_RATE = 400_000.0
TARGET_P99_MS = 250.0
TARGET_ORDER_BYTES = 1024.0
TARGET_ID_BYTES = 100.0
FLAT_RSS_TOLERANCE = 0.10
"""Actor memory counts as flat when the median of the last third of its private RSS
samples lies within 10% of the median of the middle third."""

MIN_TREND_SAMPLES = 6
"""Memory samples below which the run is too short to judge a trend by thirds."""

CORES_BOUND_SHARE = 0.75
"""Share of the CPU-time bound (2 cores over the CPU time per event) that the run
measured for CPU time must reach for the report to call the cores the bound."""


def write_report(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(results), encoding="utf-8")


def render_report(results: Results) -> str:
    parts = [
        _header(results),
        _machine(results),
        _versions(results),
        _workload(results),
        _targets(results),
        _throughput(results),
        _edge(results),
        _naive(results),
        _peer(results),
        _latency(results),
        _memory(results),
        _growth(results),
        _profile(results),
        _bounds(results),
    ]
    return "\n\n".join(part.strip() for part in parts) + "\n"


def _rate(figure: Figure | None) -> str:
    return "not measured" if figure is None else f"{figure.format()} events/s"


def _best(figures: dict[int, Figure]) -> tuple[int, Figure] | None:
    if not figures:
        return None
    partitions = max(figures, key=lambda p: figures[p].median)
    return partitions, figures[partitions]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _header(results: Results) -> str:
    sizes = results.sizes
    load_before = ", ".join(f"{x:.2f}" for x in results.load_before)
    load_after = ", ".join(f"{x:.2f}" for x in results.load_after)
    quick = (
        "\n\nThis is a **quick** run: one repeat of each figure on small inputs. It "
        "checks that every benchmark works; its numbers are not comparable with a "
        "full run, and it judges no target. With "
        f"{sizes.order_count:,} open orders, for one, each order carries more of "
        "the state's fixed cost than in a full run."
        if sizes.mode == "quick"
        else ""
    )
    commit = results.commit or "(not recorded)"
    return f"""# Benchmarks

Written by `{results.command}` (`make bench`; `make bench-quick` for the quick mode)
on {results.started_at:%Y-%m-%d %H:%M} UTC, measuring commit {commit}. The run
took {results.duration_s / 60:.1f} minutes. Every figure is the median over
{sizes.repeats} run(s) with the minimum and maximum in brackets, unless a table states
otherwise. All traffic goes to a nats-server
the suite starts on 127.0.0.1 and to a local Ray instance.

The 1, 5 and 15 minute load averages were {load_before} at the start and {load_after}
at the end. Anything else running on the machine takes cores from the benchmark and
lowers the figures.{quick}"""


def _machine(results: Results) -> str:
    rows = [[key, value] for key, value in results.machine.items()]
    return "## Machine\n\n" + _table(["", ""], rows)


def _versions(results: Results) -> str:
    rows = [[key, value] for key, value in results.versions.items()]
    return "## Versions\n\n" + _table(["software", "version"], rows)


def _workload(results: Results) -> str:
    w = results.workload
    sizes = results.sizes
    return f"""## Workload

The generated plant stream (`pipeline.sources.generated.iter_events`) with its faults:
about 3% duplicates, 2% of orders out of order and 0.5% bad messages.

- One event per message: {w.get("messages", 0):,} messages from {w.get("plants", 0)}
  plants and about {w.get("orders", 0):,} orders.
- Edge batches: the same events, {EDGE_BATCH_EVENTS} events of one plant per message on
  `plant.events.<plant>.batch`, {w.get("edge_messages", 0):,} messages with
  {w.get("edge_events", 0):,} events. Malformed JSON messages are left out, because one
  would make its whole array invalid.
- Pipeline settings: the defaults (fetch batch 2000, checkpoint every 2 s) except a
  fetch timeout of 0.1 s, so that the idle fetch at the end of a drained stream does not
  add 0.5 s to each run.
- Sizes of this run: naive {sizes.naive_events:,} events; latency
  {sizes.latency_seconds:g} s per run, {sizes.latency_repeats} run(s) per rate;
  memory {sizes.id_count:,} ids and {sizes.order_count:,} orders; soak
  {w.get("soak_messages", 0):,} messages; growth {sizes.growth_events:,} messages
  per run."""


def _latency_p99(results: Results, share: float) -> Figure | None:
    runs = results.latency.get(share)
    if not runs:
        return None
    return summarize([run.p99_ms for run in runs])


def _rss_thirds(values: list[int]) -> tuple[float, float]:
    """Return the median RSS of the middle and of the last third of a trace."""
    third = len(values) // 3
    # A trace of fewer than three samples (the quick mode) has no middle third.
    middle = values[third : 2 * third] or values
    return statistics.median(middle), statistics.median(values[2 * third :])


def _rss_growth(values: list[int]) -> float:
    middle, last = _rss_thirds(values)
    return (last - middle) / middle


def _rss_swing(values: list[int]) -> float:
    """Largest minus smallest sample after the first third, over their median."""
    later = values[len(values) // 3 :]
    return (max(later) - min(later)) / statistics.median(later)


def _rss_flat(results: Results) -> tuple[bool, str] | None:
    """Judge the actors' private memory after warm-up by its trend: the median of the
    last third of the samples against the median of the middle third.

    The samples swing with each checkpoint (the serialised state and the joined
    snapshot tables exist for a moment), so a single sample shows little. A leak or a
    state that keeps growing moves the median of a whole third. The shared part of RSS
    is left out (`RssTrace.private`): it is Ray's object store, bounded by its size.
    """
    trace = results.soak_trace
    if trace is None or len(trace.seconds) < MIN_TREND_SAMPLES:
        return None
    actors = [
        trace.private(pid) for pid in trace.by_pid if pid != results.soak_driver_pid
    ]
    worst = max((_rss_growth(values) for values in actors), key=abs)
    swing = max(_rss_swing(values) for values in actors)
    return (
        abs(worst) <= FLAT_RSS_TOLERANCE,
        f"median of the last third {worst:+.1%} against the middle third (samples "
        f"swing by up to {swing:.0%} around a checkpoint)",
    )


def _targets(results: Results) -> str:
    rows: list[list[str]] = []
    # A quick run's inputs are too small and its runs too few to judge a target.
    quick = results.sizes.mode == "quick"

    def add(
        target: str,
        measured: str,
        met: bool | None,
        *,
        within_noise: bool = False,
        qualified: str | None = None,
    ) -> None:
        if met is None:
            verdict = "not measured"
        elif quick:
            verdict = "not judged (quick run)"
        elif met:
            verdict = "met, within the noise" if within_noise else qualified or "met"
        else:
            verdict = "**not met**"
        rows.append([target, measured, verdict])

    best = _best(results.pipeline)
    if best and results.ceiling:
        share = best[1].median / results.ceiling.median
        add(
            "end to end ≥ 70% of the ceiling (one event per message)",
            f"{share:.0%} ({best[1].median:,.0f} of {results.ceiling.median:,.0f} "
            f"events/s, {best[0]} partitions)",
            share >= TARGET_CEILING_SHARE,
        )
    if best and results.naive:
        factor = best[1].median / results.naive.median
        add(
            "≥ 10x the naive design",
            f"{factor:.1f}x ({best[1].median:,.0f} vs "
            f"{results.naive.median:,.0f} events/s)",
            factor >= TARGET_NAIVE_FACTOR,
        )
    if results.state_rate and results.bytewax:
        factor = results.state_rate.median / results.bytewax.median
        measured = (
            f"{factor:.2f}x ({results.state_rate.median:,.0f} vs "
            f"{results.bytewax.median:,.0f} events/s; {_spread_note(results)})"
        )
        if results.state_rate_arrow:
            # The verdict compares the same work. The Arrow step builds the DuckDB
            # snapshot, which the peer has no counterpart of, but the actor runs it.
            arrow = results.state_rate_arrow.median
            measured += (
                ". Judged without turning the snapshot rows into Arrow tables, a "
                "step the peer does not have; with it, as the partition actor runs, "
                f"{arrow / results.bytewax.median:.2f}x ({arrow:,.0f} events/s)"
            )
        add(
            "ahead of the Bytewax peer (same logic, in memory, 1 core each)",
            measured,
            factor > 1.0,
            within_noise=_ranges_overlap(results),
        )
    else:
        add("ahead of the Bytewax peer", "bytewax not installed", None)
    edge = _best(results.edge_pipeline)
    if edge:
        add(
            "edge batches ≥ 400,000 events/s end to end",
            f"{edge[1].median:,.0f} events/s ({edge[0]} partitions)",
            edge[1].median >= TARGET_EDGE_RATE,
        )
    else:
        add("edge batches ≥ 400,000 events/s end to end", results.edge_note, None)
    p99 = _latency_p99(results, 0.50)
    if p99:
        measured = f"{p99.median:,.0f} ms"
        if len(p99.samples) > 1:
            measured += (
                f", the median of {len(p99.samples)} runs ({p99.low:,.0f} to "
                f"{p99.high:,.0f} ms)"
            )
        over = sum(sample >= TARGET_P99_MS for sample in p99.samples)
        if over:
            measured += f"; {over} of them at or over {TARGET_P99_MS:,.0f} ms"
        add(
            "p99 publish → posting stored < 250 ms at 50% of max throughput",
            measured,
            p99.median < TARGET_P99_MS,
            qualified=(
                f"met on the median, not in {over} of {len(p99.samples)} runs"
                if over
                else None
            ),
        )
    if results.per_order:
        add(
            "≤ 1 KB per open order",
            f"{results.per_order.median:,.0f} B",
            results.per_order.median <= TARGET_ORDER_BYTES,
        )
    if results.per_id:
        add(
            "≤ 100 B per remembered event id",
            f"{results.per_id.median:,.0f} B",
            results.per_id.median <= TARGET_ID_BYTES,
        )
    flat = _rss_flat(results)
    target = (
        "actor memory flat over the long run (private RSS: median of the last third "
        "within 10% of the middle third's)"
    )
    if flat:
        add(target, flat[1], flat[0])
    else:
        add(target, "too few memory samples in this run to judge a trend", None)
    return "## Targets\n\n" + _table(["target", "measured", "verdict"], rows)


def _throughput(results: Results) -> str:
    ceiling = results.ceiling
    rows = [["ceiling: bare pull consumer, decode, ack", _rate(ceiling), "100%"]]
    for partitions, figure in results.pipeline.items():
        share = f"{figure.median / ceiling.median:.0%}" if ceiling else ""
        rows.append(
            [f"pipeline, {partitions} partition actor(s)", _rate(figure), share]
        )
    without = results.without_sink
    if without is not None:
        share = f"{without.median / ceiling.median:.0%}" if ceiling else ""
        rows.append([_without_sink_label(results), _rate(without), share])
    checks = sorted({run.postings_stored for run in results.pipeline_runs})
    return f"""## Throughput: one event per message

Events per second from the first fetch until the last message is acknowledged. The
ceiling consumer fetches the same messages with the same batch size, decodes each event
with `contracts.codec.decode_event` and acks the last message of each batch: like the
pipeline's, its consumer acknowledges all. The pipeline fetches, routes, applies in the
partition actors, stores the postings in ERP_POSTINGS, writes the snapshot rows to
DuckDB at each checkpoint and acks what the checkpoint covers. Its time also includes
the last, empty fetch (0.1 s), which tells it the stream is drained. Each repeat runs
the ceiling first and then the pipeline at every partition count, so the ceiling's runs
are spread over the same minutes as the pipeline's. The last row is the pipeline without
the DuckDB writes, run in the same repeats: the actors still build the snapshot rows,
but the ingest does not write them, which shows what the writes cost.

{_table(["consumer", "events/s", "of ceiling"], rows)}

Postings stored in ERP_POSTINGS per pipeline run: {", ".join(f"{c:,}" for c in checks)}
(one value means every run stored the same postings)."""


def _edge(results: Results) -> str:
    rows = [["ceiling: bare pull consumer, decode, ack", _rate(results.edge_ceiling)]]
    if results.edge_pipeline:
        for partitions, figure in results.edge_pipeline.items():
            rows.append([f"pipeline, {partitions} partition actor(s)", _rate(figure)])
        if results.edge_without_sink is not None:
            rows.append(
                [_without_sink_label(results), _rate(results.edge_without_sink)]
            )
    else:
        rows.append(["pipeline", results.edge_note])
    return f"""## Throughput: edge batches

The same events, {EDGE_BATCH_EVENTS} per message. Rates count events, not messages.

{_table(["consumer", "events/s"], rows)}"""


def _without_sink_label(results: Results) -> str:
    return (
        f"pipeline, {results.without_sink_partitions} partition actor(s), "
        "no DuckDB writes"
    )


def _naive(results: Results) -> str:
    best = _best(results.pipeline)
    factor = (
        "The pipeline's best figure is "
        f"{best[1].median / results.naive.median:.1f}x this."
        if best and results.naive
        else ""
    )
    return f"""## Naive design

The same partition actors ({results.naive_partitions}), called once per event: one
`PartitionActor.apply.remote` with a one-message batch, its postings published and
acknowledged by JetStream, then the source message acked; the snapshot rows go to
DuckDB once at the end. ({results.sizes.naive_events:,} events per run.)

Throughput: {_rate(results.naive)}. {factor}"""


def _peer(results: Results) -> str:
    parity = (
        f"Both emitted {results.state_postings:,} postings."
        if results.state_postings == results.bytewax_postings
        else f"PartitionState emitted {results.state_postings:,} postings, the peer "
        f"{results.bytewax_postings:,}."
    )
    if results.bytewax is None:
        peer_line = (
            "- Bytewax dataflow: skipped, because bytewax is not installed "
            "(`pip install bytewax` to measure it)."
        )
        parity = ""
    else:
        peer_line = (
            f"- Bytewax {results.bytewax_version} dataflow: {_rate(results.bytewax)}"
        )
    return f"""## Peer: Bytewax

The deduplication and correlation over the same messages in memory, in this process,
one core each. The Bytewax dataflow (`benchmarks/peer_bytewax.py`) decodes with the
same contract, keys by plant and order, machine or delivery, keeps the seen ids, the
order or machine and the parked events in Bytewax state and applies events with the
same functions of `actors.orders` and `actors.machines`. PartitionState also keeps
each plant's clock, the event ledger and the snapshot rows, which the peer does not.
The first figure leaves out turning those rows into Arrow tables; the second includes
it, as the partition actor runs.

- plantstream PartitionState.apply_batch: {_rate(results.state_rate)}
- the same with the rows turned into Arrow tables: {_rate(results.state_rate_arrow)}
{peer_line}

{parity}"""


def _latency_row(share: float, runs: list[LatencyRun]) -> list[str]:
    def figure(values: list[float]) -> str:
        return summarize(values).format()

    return [
        f"{share:.0%}",
        figure([run.target_rate for run in runs]),
        figure([run.achieved_rate for run in runs]),
        figure([run.p50_ms for run in runs]),
        figure([run.p95_ms for run in runs]),
        figure([run.p99_ms for run in runs]),
        f"{sum(run.measured for run in runs):,}",
    ]


def _latency(results: Results) -> str:
    rows = [_latency_row(share, runs) for share, runs in results.latency.items()]
    table = _table(
        [
            "share of max",
            "target rate /s",
            "published /s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "postings measured, all runs",
        ],
        rows,
    )
    return f"""## Latency

Publish → posting stored in ERP_POSTINGS, for events published at a fixed rate while
the pipeline runs ({results.latency_partitions} partitions, with the DuckDB sink and
checkpoints every 2 s). The maximum is the best end-to-end median above,
{results.latency_max_rate:,.0f} events/s. A child process publishes and watches the
postings stream with an ordered consumer, and timestamps both ends with its own
monotonic clock; events of the first second are left out as warm-up. Each percentile is
the median over the runs, with min–max.

{table}"""


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def _memory(results: Results) -> str:
    lines = [
        "## Memory",
        "",
        "Python allocations of PartitionState measured with tracemalloc over "
        f"{results.sizes.order_count:,} open orders (releases from the generated "
        "stream: 2 to 5 BOM components and 1 to 3 operations each) and "
        f"{results.sizes.id_count:,} remembered event ids:",
        "",
        f"- per open order: {results.per_order.format() if results.per_order else '-'} "
        "bytes, or "
        f"{results.per_order_with_id.format() if results.per_order_with_id else '-'} "
        "bytes with the release's remembered event id",
        "- per remembered event id: "
        f"{results.per_id.format(1) if results.per_id else '-'} "
        "bytes (the id's 64-bit hash and a 30-bit payload hash in the arrays of "
        "`actors.id_table.IdTable`, whose index is at most half full)",
    ]
    if results.order_sites:
        lines += [
            "",
            "Where an open order's bytes are allocated (tracemalloc, by source line, "
            "per order):",
            "",
            _table(
                ["source line", "bytes per order"],
                [
                    [f"`{site.location}`", f"{site.bytes_per_order:,.0f}"]
                    for site in results.order_sites
                ],
            ),
        ]
    trace = results.soak_trace
    soak = results.soak
    if trace is not None and soak is not None:
        lines += [
            "",
            f"Resident memory over a long run: {soak.events:,} messages through "
            f"{soak.partitions} partition actors in {soak.seconds:.1f} s, sampled "
            "every "
            f"{results.sizes.soak_interval_s:g} s ({len(trace.seconds)} samples).",
            "",
        ]
        judged = len(trace.seconds) >= MIN_TREND_SAMPLES
        if not judged:
            lines += [
                f"With fewer than {MIN_TREND_SAMPLES} samples the thirds say nothing "
                "about a trend, so the growth columns are left empty.",
                "",
            ]
        rows = []
        for index, (pid, values) in enumerate(trace.by_pid.items()):
            name = "driver" if pid == results.soak_driver_pid else f"actor {index}"
            private = trace.private(pid)
            middle, last = _rss_thirds(private)
            shared = _mib(values[-1] - private[-1]) if trace.has_shared else "-"
            rows.append(
                [
                    name,
                    _mib(private[0]),
                    _mib(int(middle)),
                    _mib(int(last)),
                    f"{_rss_growth(private):+.1%}" if judged else "-",
                    f"{_mib(min(private[len(private) // 3 :]))} to "
                    f"{_mib(max(private))}",
                    shared,
                    f"{_rss_growth(values):+.1%}" if judged else "-",
                ]
            )
        lines.append(
            _table(
                [
                    "process",
                    "private, start",
                    "median, middle third",
                    "median, last third",
                    "growth",
                    "range after the first third",
                    "shared at the end",
                    "growth of the whole RSS",
                ],
                rows,
            )
        )
        lines += [
            "",
            "Private memory is VmRSS without RssShmem. The shared part is mostly Ray's "
            "object store, which a worker maps whole: a page of it counts in the "
            "worker's RSS from the first time the worker writes or reads a "
            "checkpoint there, so that part rises in steps up to the store's fixed "
            "size whatever the actor keeps."
            if trace.has_shared
            else "This run did not sample the shared part, so the private columns "
            "show the whole RSS.",
        ]
        lines += ["", _soak_state(results, soak)]
    return "\n".join(lines)


def _total(stats: list[dict[str, object]], name: str) -> int:
    return sum(int(s.get(name, 0)) for s in stats)  # type: ignore[call-overload]


def _soak_state(results: Results, soak: PipelineRun) -> str:
    orders = _total(soak.partition_stats, "orders")
    ids = _total(soak.partition_stats, "remembered_ids")
    evicted = _total(soak.partition_stats, "orders_evicted")
    text = (
        f"At the end the actors held {orders:,} orders and {ids:,} remembered ids, "
        f"and had evicted {evicted:,} completed orders. "
    )
    settings = results.soak_settings
    if settings is not None:
        text += (
            f"The actors ran with `dedup_max_ids` {settings.dedup_max_ids:,} and "
            f"`closed_order_retention_s` {settings.closed_order_retention_s:,.0f} s, "
            + (
                "so that in a full run the id table fills and completed orders are "
                "evicted early; this quick run is too short for either."
                if results.sizes.mode == "quick"
                else "so that the id table fills and completed orders are evicted "
                "early in the run."
            )
            + " Growth compares the median sample of the last third of the run "
            "with that of the middle third; the range shows how far single samples "
            "swing around checkpoints. Orders with an active hold or blocked stock "
            "are never evicted, and the generated stream leaves about 2 orders per "
            "1,000 messages under a hold that is never released, so the state still "
            "grows slowly. "
        )
    if results.per_id is not None:
        default_ids = StateSettings().dedup_max_ids
        text += (
            f"With the default `dedup_max_ids` ({default_ids:,}) a full id table "
            f"takes about {_mib(default_ids * results.per_id.median)} per partition "
            f"({default_ids:,} ids at the measured {results.per_id.median:.0f} bytes "
            "per id), which is the id table's share of the steady state."
        )
    return text


def _growth_rows(rows: list[GrowthRow], with_pipeline: bool) -> str:
    header = [
        "state",
        "apply events/s (in process)",
        "state memory",
        "base checkpoint",
        "base ms",
        "delta checkpoint",
        "delta ms",
    ]
    if with_pipeline:
        header.append("pipeline events/s (2 partitions)")
    body = []
    for row in rows:
        cells = [
            row.label,
            row.rate.format(),
            _mib(row.memory_bytes or 0),
            _mib(row.checkpoint_bytes or 0),
            row.checkpoint_seconds.format(1, 1e-3) if row.checkpoint_seconds else "-",
            _mib(row.delta_bytes) if row.delta_bytes is not None else "-",
            row.delta_seconds.format(1, 1e-3) if row.delta_seconds else "-",
        ]
        if with_pipeline:
            cells.append(row.pipeline_rate.format() if row.pipeline_rate else "-")
        body.append(cells)
    return _table(header, body)


def _growth(results: Results) -> str:
    return f"""## Growth

PartitionState in this process, preloaded with open orders (releases that nothing
completes) or with remembered event ids ({StateSettings().dedup_max_ids:,} is the
default `dedup_max_ids`), then timed over the same
{results.sizes.growth_events:,} generated messages.
State memory is tracemalloc's count after the run, and the checkpoint sizes are those of
the first run. A checkpoint is the MessagePack the
ingest stores for each partition: the state (machines, parked events, clocks and
counts) and either every order and remembered id (a base) or the orders and ids changed
since the checkpoint before (a delta). The delta here holds the orders and ids the
timed run changed, against a base taken after the preload. The last column is the
whole pipeline (2 partitions, DuckDB sink) over the same messages, timed after it
applied and committed the same open orders' releases. An id preload has no pipeline
figure, because the pipeline would have to apply that many events first.

{_growth_rows(results.growth_orders, with_pipeline=True)}

The same at different plant counts, each row with its own message count (rates are per
event, so rows of different counts compare), and the whole pipeline on the same
messages:

{_growth_rows(results.growth_plants, with_pipeline=True)}"""


def _profile(results: Results) -> str:
    lines = ["## Profile", ""]
    driver = results.driver_profile
    if driver is not None:
        seconds = driver.run.seconds
        phase_rows = [
            [name, f"{value:.2f}", f"{value / seconds:.0%}"]
            for name, value in sorted(driver.phases.items(), key=lambda kv: -kv[1])
        ]
        lines += [
            f"The driver (ingest loop) over one run of {driver.run.events:,} messages, "
            f"{driver.run.partitions} partitions, {seconds:.1f} s "
            f"({driver.run.rate:,.0f} events/s). Time per step, as the ingest records "
            "it (`IngestReport.seconds`). The steps overlap: the next fetch runs while "
            "a batch is routed, the actors apply a batch while the next is routed, and "
            "a checkpoint's DuckDB write, object-store puts and ack run in the "
            "background. So the shares add up to more than 100%, and `fetch` and "
            "`apply` count only the time the loop waited for them. `serialise` is the "
            "time the slowest partition spent building each checkpoint, during which "
            "it applied nothing:",
            "",
            _table(["phase", "seconds", "share"], phase_rows),
            "",
            f"Where the driver thread was, from {driver.samples:,} stack samples every "
            "2 ms (`benchmarks/sampler.py`; innermost Python function, and anywhere on "
            "the stack):",
            "",
            _hotspot_table(driver.hotspots),
        ]
        if driver.actor_samples:
            lines += [
                "",
                "Where the partition actors' main threads were in the same run, "
                f"from {driver.actor_samples:,} samples every 2 ms taken by a thread "
                "in each actor (`ThreadSampler` in `benchmarks/sampler.py`), by "
                "share on the stack. Ray's frames around each call are left out. "
                f"`{RAY_TASK_LOOP}` innermost is Ray's task loop: the actor "
                "waited for its next call, or ran Ray's compiled code, which has no "
                "Python frames:",
                "",
                _hotspot_table(driver.actor_hotspots),
            ]
    for title, split in (
        ("one event per message", results.cpu_split),
        ("edge batches", results.edge_cpu_split),
    ):
        if split is None:
            continue
        lines += [
            "",
            f"CPU time per process over one run with {title} "
            f"({split.run.events:,} events, {split.run.partitions} partitions, "
            f"{split.run.rate:,.0f} events/s; `benchmarks/cpu.py` reads the user "
            "and system time of the driver and of each process it started, Ray's "
            "and nats-server, from /proc before and after the run):",
            "",
            _table(
                ["process", "CPU seconds", "µs per event"],
                [
                    [s.process, f"{s.cpu_seconds:.2f}", f"{s.us_per_event:.1f}"]
                    for s in split.shares
                ]
                + [["all", "", f"{split.us_per_event:.1f}"]],
            ),
        ]
    if results.state_profile:
        lines += [
            "",
            "PartitionState.apply_batch over the one-event-per-message workload, with "
            "cProfile (share of the profiled time; cProfile's own overhead inflates "
            "functions with many small calls):",
            "",
            _table(
                ["function", "calls", "own", "with callees"],
                [
                    [
                        f"`{f.function}`",
                        f"{f.calls:,}",
                        f"{f.own_share:.1%}",
                        f"{f.cumulative_share:.1%}",
                    ]
                    for f in results.state_profile
                ],
            ),
        ]
    return "\n".join(lines)


def _hotspot_table(hotspots: list[Hotspot]) -> str:
    return _table(
        ["function", "innermost", "on stack"],
        [
            [f"`{h.function}`", f"{h.self_share:.1%}", f"{h.total_share:.1%}"]
            for h in hotspots
        ],
    )


def _bounds(results: Results) -> str:
    """Explain each missed target from what this run measured."""
    lines = ["## What bounds the missed targets", ""]
    for explain in (
        _bound_throughput,
        _bound_edge,
        _bound_latency,
        _bound_peer,
        _bound_ids,
        _bound_orders,
        _bound_rss,
    ):
        lines += explain(results)
    return "\n".join(lines)


def _bound_throughput(results: Results) -> list[str]:
    best = _best(results.pipeline)
    split = results.cpu_split
    if best is None or results.ceiling is None or split is None:
        return []
    if best[1].median >= TARGET_CEILING_SHARE * results.ceiling.median:
        return []
    actors = sum(s.us_per_event for s in split.shares if "actor" in s.process)
    driver = sum(s.us_per_event for s in split.shares if "driver" in s.process)
    server = sum(s.us_per_event for s in split.shares if s.process == "nats-server")
    bound = 2e6 / split.us_per_event
    # Only a run that comes near the bound shows that CPU time, not waiting, held it
    # back. A quick run spends much of its short time starting up.
    saturated = split.run.rate >= CORES_BOUND_SHARE * bound
    return [
        "**End to end against the ceiling.** "
        + ("The two cores are the bound: in" if saturated else "In")
        + " the run "
        f"measured for CPU time the processes used {split.us_per_event:.1f} µs of CPU "
        f"per event (the partition actors {actors:.1f} µs, the driver {driver:.1f} "
        f"µs, nats-server {server:.1f} µs), which allows at most about {bound:,.0f} "
        f"events/s on 2 cores; that run reached {split.run.rate:,.0f}"
        + ("" if saturated else ", too far below that to call the cores the bound")
        + ". The ceiling "
        "does only the fetch, one decode per event and one ack per batch. The "
        "pipeline does those too, and also applies the event (about "
        f"{1e6 / results.state_rate.median if results.state_rate else 0:.0f} µs per "
        "event in PartitionState alone), publishes its postings, builds the "
        "snapshot rows and writes them to DuckDB, and serialises each partition "
        "at every checkpoint. The profile tables above show that cost spread over "
        "many functions, with no single hot spot left to remove."
        + _actor_busy(results)
        + _sink_cost(results),
        "",
    ]


def _sink_cost(results: Results) -> str:
    """Compare the pipeline with and without its DuckDB writes, or return ""."""
    without = results.without_sink
    with_sink = results.pipeline.get(results.without_sink_partitions)
    if without is None or with_sink is None or results.ceiling is None:
        return ""
    cost = 1e6 / with_sink.median - 1e6 / without.median
    below = without.median < TARGET_CEILING_SHARE * results.ceiling.median
    return (
        f" Without the DuckDB writes, {results.without_sink_partitions} partition "
        f"actors reached {without.median:,.0f} events/s "
        f"({without.median / results.ceiling.median:.0%} of the ceiling) against "
        f"{with_sink.median:,.0f} with them: "
        + (
            f"the writes add {cost:.0f} µs of wall time per event, because they "
            "share the 2 cores with the rest. "
            if cost > 0
            # Run-to-run noise can put the run with the writes ahead.
            else "the writes cost nothing measurable in this run. "
        )
        + (
            "Even with no snapshot written, the pipeline stays below the target."
            if below
            else "Without them the pipeline would meet the target."
        )
    )


def _actor_busy(results: Results) -> str:
    """Summarise where the actors' samples were, or return "" without them."""
    profile = results.driver_profile
    if profile is None or not profile.actor_samples:
        return ""
    shares = {h.function: h for h in profile.actor_hotspots}

    def on_stack(function: str) -> float:
        found = shares.get(function)
        return 0.0 if found is None else found.total_share

    waiting = shares.get(RAY_TASK_LOOP)
    busy = 1.0 - (waiting.self_share if waiting is not None else 0.0)
    apply = on_stack("actors/partition_state.py:apply_batch")
    chunks = on_stack("actors/partition_state.py:_build_chunks")
    checkpoint = on_stack("actors/partition.py:checkpoint")
    return (
        f" In the profiled run, {busy:.0%} of the partition actors' samples found "
        f"them busy: {apply:.0%} of all samples in apply_batch ({chunks:.0%} in "
        f"`_build_chunks`, which turns rows into Arrow) and {checkpoint:.0%} building "
        "checkpoints."
    )


def _bound_edge(results: Results) -> list[str]:
    edge = _best(results.edge_pipeline)
    if edge is None or results.edge_ceiling is None:
        return []
    if edge[1].median >= TARGET_EDGE_RATE:
        return []
    lines = [
        "**Edge batches.** The bare consumer decodes "
        f"{results.edge_ceiling.median:,.0f} events/s from edge batches, but the "
        f"pipeline reaches {edge[1].median:,.0f}. 400,000 events/s on 2 cores leaves "
        "5 µs of CPU per event for everything."
    ]
    split = results.edge_cpu_split
    if split is not None:
        lines[0] += (
            f" The pipeline used {split.us_per_event:.1f} µs per event in the run "
            "measured for CPU time (the table in Profile)"
        )
        if results.state_rate:
            lines[0] += (
                f", and PartitionState alone, in memory, spends "
                f"{1e6 / results.state_rate.median:.0f} µs per event"
            )
        lines[0] += (
            ". Reaching the target needs the per-event work done outside Python "
            "objects (columnar state, or a compiled core), which this code base "
            "does not have."
        )
    return [*lines, ""]


def _bound_latency(results: Results) -> list[str]:
    lines: list[str] = []
    driver = results.driver_profile
    p99 = _latency_p99(results, 0.50)
    if p99 is not None and p99.high < TARGET_P99_MS:
        return []
    if p99 is not None and driver is not None and driver.run.checkpoints:
        per_checkpoint = driver.phases.get("serialise", 0) / driver.run.checkpoints
        lines += [
            "**Latency.** Postings are published as soon as their batch is applied, "
            "and the DuckDB write and the checkpoint's puts run in the background. "
            "What still holds events back is step 5a: every 2 s each partition "
            "serialises its state (its machines and parked events whole, the orders "
            "and ids changed since the last checkpoint) and joins the snapshot "
            "chunks it built after each batch, "
            f"{per_checkpoint * 1000:,.0f} ms per checkpoint on average in the "
            "profiled run, and the events queued behind it wait. The commit that "
            "follows waits 0.4 s (`COMMIT_DEFER_S`) so that those events go first, "
            "and its DuckDB write runs in a thread of lower CPU priority. The latency "
            "run's publisher and postings watcher run in a process of their own, but "
            "all of them share the same 2 cores. p99 at 50% of the maximum was "
            f"{p99.median:,.0f} ms.",
            "",
        ]
    high = results.latency.get(0.80)
    if high:
        p50 = summarize([run.p50_ms for run in high]).median
        lines += [
            f"At 80% of the maximum the p50 is {p50:,.0f} ms. The maximum was "
            "measured without a publisher running, while here the publisher and the "
            "postings watcher share the 2 cores with the pipeline, which then falls "
            "behind and the backlog adds to every event's latency.",
            "",
        ]
    return lines


def _ranges_overlap(results: Results) -> bool:
    """Return whether the in-memory rates of plantstream and of Bytewax overlap."""
    assert results.state_rate is not None and results.bytewax is not None
    return (
        results.state_rate.high >= results.bytewax.low
        and results.bytewax.high >= results.state_rate.low
    )


def _spread_note(results: Results) -> str:
    return (
        "the run-to-run ranges overlap"
        if _ranges_overlap(results)
        else "the run-to-run ranges are apart"
    )


def _bound_peer(results: Results) -> list[str]:
    if results.bytewax is None or results.state_rate is None:
        return []
    if results.state_rate.median >= results.bytewax.median:
        return []
    return [
        "**Against Bytewax.** Both apply events with the same functions of "
        "`actors.orders` and `actors.machines`, so the difference is what "
        "PartitionState does besides: it collects the snapshot rows, one event-ledger "
        "row per message for `plantstream reconcile`, each plant's clock, and keeps "
        "its ids in a compact table that costs more per lookup than the peer's "
        "Python dict. The cProfile table above shows that bookkeeping spread over "
        f"`_accept`, `_ledger` and `_collect`, at {results.state_rate.median:,.0f} "
        f"against {results.bytewax.median:,.0f} events/s; {_spread_note(results)}.",
        "",
    ]


def _bound_ids(results: Results) -> list[str]:
    if results.per_id is None or results.per_id.median <= TARGET_ID_BYTES:
        return []
    return [
        "**Bytes per remembered event id.** The id table keeps a 64-bit hash of the "
        "id and a 30-bit payload hash in flat arrays (`actors/id_table.py`), and the "
        f"measured {results.per_id.median:,.0f} B per id include the free slots the "
        "table keeps to stay fast.",
        "",
    ]


def _bound_orders(results: Results) -> list[str]:
    if results.per_order is None or results.per_order.median <= TARGET_ORDER_BYTES:
        return []
    sites = ", ".join(
        f"`{site.location}` {site.bytes_per_order:,.0f} B"
        for site in results.order_sites[:4]
    )
    return [
        "**Bytes per open order.** Strings that repeat across orders (plant, "
        "materials, units, work centres) and identical routings are shared, and "
        "the empty per-order dicts are created only when used. What stays is what "
        "each order owns: the OrderState struct, its dict of component structs, "
        "the text of a standard quantity per BOM line, the order number, the "
        "release time, its packed event ids and the key in the orders dict. Each "
        "of these is a CPython object of 40 to 200 bytes; "
        "going below 1 KB means keeping orders in columns instead of objects. "
        f"The largest allocation sites per order: {sites}.",
        "",
    ]


def _bound_rss(results: Results) -> list[str]:
    flat = _rss_flat(results)
    if flat is None or flat[0]:
        return []
    return [
        "**Actor memory over a long run.** The id table is bounded by "
        "`dedup_max_ids` and completed orders are evicted after "
        "`closed_order_retention_s` of event time, so the state stops growing once "
        "both are reached, apart from orders that stay open (the generated stream "
        "leaves about 2 orders per 1,000 messages under a hold that is never "
        "released). RSS can still move by more than the state does. Each actor "
        "hands glibc's free heap pages back at every checkpoint (`malloc_trim`), "
        "but CPython keeps the memory of freed objects in its own pools, and a "
        "checkpoint allocates its serialised copy of the state; the run measured "
        f"{flat[1]}.",
        "",
    ]

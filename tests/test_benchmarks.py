"""The benchmark suite in quick mode: every section is written and the numbers are sane.

No test asserts a speed: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from benchmarks.cpu import process_tree_cpu_seconds
from benchmarks.latency import LatencyRun
from benchmarks.memory import RssTrace, read_rss
from benchmarks.report import SECTIONS, render_report
from benchmarks.stats import percentile, summarize
from benchmarks.workload import build_workload, edge_batches, spec_for

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK_TIMEOUT_S = 300

_NUMBER = r"([\d,]+(?:\.\d+)?)"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


def _suite(*args: str) -> subprocess.CompletedProcess[str]:
    # A child process, because the suite starts its own Ray and nats-server and its
    # stack sampler uses SIGALRM, which pytest-timeout also uses.
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def report(bench_dir: Path) -> str:
    # Folders that do not exist yet, as `out/` in a fresh clone.
    output = bench_dir / "reports" / "quick.md"
    saved = bench_dir / "out" / "results.pickle"
    completed = _suite("--quick", "--output", str(output), "--save-results", str(saved))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return output.read_text(encoding="utf-8")


def test_saved_results_render_the_same_report(report: str, bench_dir: Path) -> None:
    again = bench_dir / "again.md"
    saved = bench_dir / "out" / "results.pickle"
    completed = _suite("--render-from", str(saved), "--output", str(again))
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert again.read_text(encoding="utf-8") == report


def test_unwritable_output_stops_before_measuring(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    completed = _suite("--quick", "--output", str(blocker / "quick.md"))
    assert completed.returncode == 2
    assert f"{blocker} is a file, not a folder" in completed.stderr
    completed = _suite("--quick", "--output", str(tmp_path))
    assert completed.returncode == 2
    assert f"{tmp_path} is a folder; name the file to write" in completed.stderr


def test_render_from_checks_its_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pickle"
    completed = _suite("--render-from", str(missing), "--output", str(tmp_path / "r"))
    assert completed.returncode == 2
    assert "does not exist" in completed.stderr
    saved = tmp_path / "results.pickle"
    saved.write_bytes(b"")
    completed = _suite("--render-from", str(saved), "--output", str(saved))
    assert completed.returncode == 2
    assert "is the --render-from file" in completed.stderr
    assert saved.read_bytes() == b""


def test_render_from_garbage_rejected(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pickle"
    garbage.write_bytes(b"\xfa not a pickle at all")
    completed = _suite("--render-from", str(garbage), "--output", str(tmp_path / "r"))
    assert completed.returncode == 2
    assert "holds no results this suite saved" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_render_from_folder_named(tmp_path: Path) -> None:
    completed = _suite("--render-from", str(tmp_path), "--output", str(tmp_path / "r"))
    assert completed.returncode == 2
    assert f"--render-from {tmp_path} is a folder" in completed.stderr


def _rows(report: str, section: str) -> list[list[str]]:
    body = report.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header


def test_report_every_section(report: str) -> None:
    for section in SECTIONS:
        assert f"\n## {section}\n" in report, section


def test_report_sections_in_order(report: str) -> None:
    positions = [report.index(f"\n## {section}\n") for section in SECTIONS]
    assert positions == sorted(positions)


def test_report_machine_and_versions(report: str) -> None:
    for name in ("CPU", "cores", "RAM", "OS"):
        assert f"| {name} |" in report, name
    for package in ("python", "ray", "nats-py", "nats-server", "msgspec", "pyarrow"):
        assert f"| {package} |" in report, package
    assert "| duckdb |" in report


def test_report_names_command(report: str) -> None:
    assert "python -m benchmarks.suite --quick" in report


def test_report_names_commit(report: str) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent,
    ).stdout.strip()  # fmt: skip
    assert f"measuring commit {commit}" in report


def test_quick_report_keeps_memory_target(report: str) -> None:
    # The quick soak may have too few samples for a trend. The target row stays, and
    # the text does not claim what only a full run shows.
    rows = _rows(report, "Targets")
    assert any(row[0].startswith("actor memory flat") for row in rows)
    assert "this quick run is too short for either" in report


def test_throughput_figures_positive(report: str) -> None:
    rows = _rows(report, "Throughput: one event per message")
    consumers = [row[0] for row in rows]
    assert consumers[0].startswith("ceiling")
    for partitions in (1, 2, 4, 8):
        assert f"pipeline, {partitions} partition actor(s)" in consumers
    assert "pipeline, 2 partition actor(s), no DuckDB writes" in consumers
    for row in rows:
        median = re.match(_NUMBER, row[1])
        assert median is not None, row
        assert _number(median.group(1)) > 0, row


def test_pipeline_stores_same_postings(report: str) -> None:
    match = re.search(
        r"Postings stored in ERP_POSTINGS per pipeline run: ([\d,]+)\n", report
    )
    assert match is not None
    assert _number(match.group(1)) > 0


def test_edge_batches_figure_or_note(report: str) -> None:
    rows = _rows(report, "Throughput: edge batches")
    pipeline = [row for row in rows if row[0].startswith("pipeline")]
    assert pipeline
    if "not yet supported" not in pipeline[0][1]:
        assert pipeline[-1][0].endswith("no DuckDB writes"), pipeline
    for row in pipeline:
        assert re.match(_NUMBER, row[1]) or "not yet supported" in row[1], row


def test_quick_run_judges_no_target(report: str) -> None:
    rows = _rows(report, "Targets")
    assert len(rows) >= 7
    for row in rows:
        assert row[2] in {"not judged (quick run)", "not measured"}, row


def _full_mode_targets(bench_dir: Path, **changes: object) -> dict[str, list[str]]:
    """Render the quick run's saved results as a full run's, with `changes` applied."""
    saved = bench_dir / "out" / "results.pickle"
    results = pickle.loads(saved.read_bytes())  # noqa: S301 (written by the suite)
    results.sizes = dataclasses.replace(results.sizes, mode="full")
    for name, value in changes.items():
        setattr(results, name, value)
    rows = _rows(render_report(results), "Targets")
    return {row[0].split(" (")[0]: row for row in rows}


def _latency_run(p99_ms: float) -> LatencyRun:
    return LatencyRun(1000.0, 1000, 1.0, 900, 10.0, 50.0, p99_ms)


def test_full_run_judges_targets(report: str, bench_dir: Path) -> None:
    targets = _full_mode_targets(bench_dir)
    for row in targets.values():
        assert row[2] in {"met", "**not met**", "not measured"}, row


def test_p99_verdict_names_failing_runs(report: str, bench_dir: Path) -> None:
    runs = [_latency_run(ms) for ms in (120.0, 200.0, 300.0)]
    targets = _full_mode_targets(bench_dir, latency={0.5: runs})
    row = targets["p99 publish → posting stored < 250 ms at 50% of max throughput"]
    assert row[2] == "met on the median, not in 1 of 3 runs"
    runs = [_latency_run(ms) for ms in (120.0, 200.0, 240.0)]
    targets = _full_mode_targets(bench_dir, latency={0.5: runs})
    row = targets["p99 publish → posting stored < 250 ms at 50% of max throughput"]
    assert row[2] == "met"


def test_peer_verdict_shows_arrow_figure(report: str, bench_dir: Path) -> None:
    targets = _full_mode_targets(
        bench_dir,
        state_rate=summarize([80_000.0]),
        state_rate_arrow=summarize([50_000.0]),
        bytewax=summarize([60_000.0]),
    )
    row = targets["ahead of the Bytewax peer"]
    assert row[1].startswith("1.33x (80,000 vs 60,000 events/s")
    assert "as the partition actor runs, 0.83x (50,000 events/s)" in row[1]
    assert row[2] == "met"


def test_naive_slower_than_pipeline_figure(report: str) -> None:
    match = re.search(rf"Throughput: {_NUMBER} \(", report)
    assert match is not None
    assert _number(match.group(1)) > 0


def test_peer_parity_or_skip(report: str) -> None:
    section = report.split("## Peer: Bytewax\n", 1)[1].split("\n## ", 1)[0]
    if importlib.util.find_spec("bytewax") is None:
        assert "skipped, because bytewax is not installed" in section
    else:
        assert "Both emitted" in section


def test_latency_percentiles_ordered(report: str) -> None:
    rows = _rows(report, "Latency")
    assert [row[0] for row in rows] == ["25%", "50%", "80%"]
    for row in rows:
        p50, p95, p99 = (_number(re.match(_NUMBER, cell).group(1)) for cell in row[3:6])  # type: ignore[union-attr]
        assert 0 < p50 <= p95, row
        assert p95 <= p99, row


def test_memory_per_item_positive(report: str) -> None:
    order = re.search(rf"per open order: {_NUMBER} ", report)
    event_id = re.search(rf"per remembered event id: {_NUMBER} ", report)
    assert order is not None
    assert event_id is not None
    assert _number(order.group(1)) > 0
    assert _number(event_id.group(1)) > 0


def test_memory_rss_table(report: str) -> None:
    rows = _rows(report, "Memory")
    names = [row[0] for row in rows]
    assert "actor 0" in names
    assert "driver" in names
    actor = rows[names.index("actor 0")]
    # The shared part was sampled, so its column contains a size rather than "-".
    assert actor[6].endswith("MiB"), actor


def test_private_memory_leaves_out_the_shared_part() -> None:
    trace = RssTrace(seconds=[0.0, 1.0], by_pid={7: [100, 200]})
    trace.shared_by_pid[7] = [10, 60]
    assert trace.has_shared
    assert trace.private(7) == [90, 140]


def test_older_trace_private_is_whole_rss() -> None:
    trace = RssTrace(seconds=[0.0], by_pid={7: [100]})
    # As a trace unpickled from a results file of an older suite.
    del trace.__dict__["shared_by_pid"]
    assert not trace.has_shared
    assert trace.private(7) == [100]


def test_cpu_split_process_tree_only() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        seconds = process_tree_cpu_seconds(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert os.getpid() in seconds
    assert child.pid in seconds
    # init and everything else outside this tree, such as another user's benchmark.
    assert 1 not in seconds
    assert os.getppid() not in seconds


def test_read_rss_of_this_process() -> None:
    resident, shared = read_rss(os.getpid())
    assert resident > 0
    assert 0 <= shared <= resident


def test_growth_rows(report: str) -> None:
    rows = _rows(report, "Growth")
    labels = [row[0] for row in rows]
    assert sum("open orders" in label for label in labels) == 3
    assert sum("plants" in label for label in labels) == 3
    for row in rows:
        # The pipeline column: a rate after an order preload or per plant count, and
        # none after an id preload, which the pipeline does not run.
        if row[0] == "state":
            continue  # the second table's header
        if "remembered ids" in row[0]:
            assert row[-1] == "-"
        else:
            assert _number(row[-1].split()[0]) > 0, row


def test_profile_names_functions(report: str) -> None:
    section = report.split("## Profile\n", 1)[1]
    assert "| fetch |" in section
    assert "apply_batch" in section
    actors = section.split("partition actors' main threads", 1)[1].split("\n\n", 2)[1]
    assert "`ray/_private/worker.py:main_loop`" in actors
    assert "`actors/partition_state.py:apply_batch`" in actors


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0


def test_summarize_spread() -> None:
    figure = summarize([3.0, 1.0, 2.0])
    assert figure.median == 2.0
    assert (figure.low, figure.high) == (1.0, 3.0)
    assert figure.format() == "2 (1–3, n=3)"


def test_summarize_empty_rejected() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        summarize([])


def test_edge_batches_one_plant_each() -> None:
    messages = build_workload(spec_for(2_000, plants=3)).messages
    batches = edge_batches(messages, size=50)
    for subject, body, count in batches:
        events = msgspec.json.decode(body)
        plants = {event.get("plant") for event in events if isinstance(event, dict)}
        assert subject.endswith(".batch"), subject
        assert len(events) == count
        assert count <= 50
        assert len(plants - {None}) <= 1, plants


def test_edge_batches_keep_valid_json() -> None:
    messages = build_workload(spec_for(2_000, plants=3)).messages
    batches = edge_batches(messages, size=50)
    well_formed = 0
    for _, data in messages:
        try:
            msgspec.json.decode(data)
        except msgspec.DecodeError:
            continue
        well_formed += 1
    assert sum(count for _, _, count in batches) == well_formed


def test_cpu_table_names_every_process(report: str) -> None:
    section = report.split("CPU time per process over one run with one event", 1)[1]
    table = section.split("\n\n", 2)[1]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()[2:]
    ]
    labels = [row[0] for row in rows]
    assert "driver (ingest loop and DuckDB writer)" in labels
    assert "nats-server" in labels
    assert labels[-1] == "all"
    for label in labels[:-1]:
        assert (
            label.startswith(("driver", "partition actor", "nats-server", "Ray's "))
            or label == "other processes, each under 1%"
        ), label
    listed = sum(_number(row[2]) for row in rows[:-1])
    assert abs(listed - _number(rows[-1][2])) < 0.1 * len(rows)

"""The command lines of the benchmark suite and the fault harness: option errors,
output files, and the clean-up on SIGINT and SIGTERM.

The signal tests start the real suite or harness in a child process and stop it while
its nats-server runs. Each takes about as long as Ray needs to start.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_nats_server import process_gone

from benchmarks import faults, suite
from benchmarks.results import Results
from cluster import cli

REPO_ROOT = Path(__file__).resolve().parents[1]

SERVER_TIMEOUT_S = 120.0
"""How long the suite may take to start Ray and its first nats-server."""

EXIT_TIMEOUT_S = 60.0
"""How long the suite may take to clean up and exit after a signal."""

_SERVER_STARTED = re.compile(r"nats-server started: url=\S+ store=(\S+) pid=(\d+)")


def _usage_error(
    main: Callable[[list[str]], object],
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
) -> str:
    """Run `main(argv)`, check that it exits with code 2, and return its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def unwritable_file(tmp_path: Path) -> Iterator[Path]:
    """An existing file that this user cannot write, root included."""
    path = tmp_path / "report.md"
    path.write_text("an older report\n", encoding="utf-8")
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield path
        return
    # Root ignores file modes, but not the immutable attribute.
    chattr = subprocess.run(
        ["chattr", "+i", str(path)], capture_output=True, check=False
    )
    if chattr.returncode != 0:
        pytest.skip(f"chattr +i failed on {tmp_path}: {chattr.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _no_measuring(*args: object, **kwargs: object) -> None:
    raise AssertionError("the options should have been rejected before measuring")


@pytest.fixture(autouse=True)
def no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail fast, instead of running the suite or the harness in this process, if an
    option check is missing."""
    monkeypatch.setattr(suite, "connect_ray", _no_measuring)
    monkeypatch.setattr(suite, "run_suite", _no_measuring)
    monkeypatch.setattr(faults, "connect_ray", _no_measuring)


# -- option errors -------------------------------------------------------------------


def test_suite_unwritable_output_rejected(
    unwritable_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = _usage_error(
        suite.main, ["--quick", "--output", str(unwritable_file)], capsys
    )
    assert f"cannot write {unwritable_file}" in error
    assert unwritable_file.read_text(encoding="utf-8") == "an older report\n"


def test_suite_unwritable_save_results_rejected(
    unwritable_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--quick",
        "--output",
        str(tmp_path / "quick.md"),
        "--save-results",
        str(unwritable_file),
    ]
    error = _usage_error(suite.main, argv, capsys)
    assert f"cannot write {unwritable_file}" in error
    assert not (tmp_path / "quick.md").exists()


def test_suite_empty_paths_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for option in ("--output", "--save-results", "--render-from"):
        argv = ["--output", str(tmp_path / "r.md"), option, ""]
        error = _usage_error(suite.main, argv, capsys)
        assert f"argument {option}: the value is empty" in error
        assert " . is a folder" not in error


def test_suite_bad_input_creates_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.pickle"
    garbage.write_bytes(b"\xfa not a pickle at all")
    for render_from in (tmp_path / "missing.pickle", garbage):
        output = tmp_path / "reports" / "r.md"
        saved = tmp_path / "out" / "results.pickle"
        argv = [
            "--render-from",
            str(render_from),
            "--output",
            str(output),
            "--save-results",
            str(saved),
        ]
        error = _usage_error(suite.main, argv, capsys)
        assert f"--render-from {render_from}" in error
        assert not output.parent.exists()
        assert not saved.parent.exists()


def test_log_level_names_checked(capsys: pytest.CaptureFixture[str]) -> None:
    error = _usage_error(
        suite.main, ["--output", "r.md", "--log-level", "LOUD"], capsys
    )
    assert "invalid choice: 'LOUD'" in error
    assert "'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'" in error
    # The parser only: cli.main sets signal handlers, which would stay in pytest.
    parse = cli.build_parser().parse_args
    error = _usage_error(parse, ["--log-level", "LOUD", "schema", "events"], capsys)
    assert "invalid choice: 'LOUD'" in error
    assert "'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'" in error


def test_log_level_any_case_accepted() -> None:
    args = cli.build_parser().parse_args(["--log-level", "warning", "schema", "events"])
    assert args.log_level == "WARNING"
    args = suite.build_parser().parse_args(["--output", "r.md", "--log-level", "debug"])
    assert args.log_level == "DEBUG"


@pytest.mark.parametrize("rounds", ["-1", "0"])
def test_faults_rounds_below_one_rejected(
    rounds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = _usage_error(faults.main, ["--rounds", rounds], capsys)
    assert f"argument --rounds: must be at least 1, got {rounds}" in error


@pytest.mark.parametrize(
    "field", ["rounds", "faults_per_stream", "plants", "orders_per_plant"]
)
def test_harness_config_below_one_rejected(field: str) -> None:
    config = faults.HarnessConfig(**{field: 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"HarnessConfig.{field} must be at least 1"):
        asyncio.run(faults.run_harness(config))


# -- writing the results -------------------------------------------------------------


def _results() -> Results:
    return Results(
        sizes=suite.QUICK,
        command="python -m benchmarks.suite --quick",
        started_at=dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
        machine={"cpu": "test"},
        versions={"python": "test"},
        load_before=(0.0, 0.0, 0.0),
    )


def _fail_report(results: Results, path: Path) -> None:
    raise PermissionError(1, "Operation not permitted", str(path))


def test_results_saved_before_report(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(suite, "write_report", _fail_report)
    saved = tmp_path / "results.pickle"
    code = suite.save_and_write_report(_results(), tmp_path / "r.md", saved)
    assert code == 1
    assert pickle.loads(saved.read_bytes()) == _results()  # noqa: S301 - written here
    error = capsys.readouterr().err
    assert "cannot write the report" in error
    assert f"--render-from {saved} --output FILE" in error


def test_results_kept_without_save_results(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(suite, "write_report", _fail_report)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    code = suite.save_and_write_report(_results(), tmp_path / "r.md", None)
    assert code == 1
    [kept] = tmp_path.glob("plantstream-bench-results-*.pickle")
    assert pickle.loads(kept.read_bytes()) == _results()  # noqa: S301 - written here
    assert f"--render-from {kept} --output FILE" in capsys.readouterr().err


# -- signals -------------------------------------------------------------------------


def _signal_in_run(
    command: list[str], signum: signal.Signals, temporary: Path
) -> tuple[int, str, Path, int]:
    """Run `command`, send it `signum` once it has started a nats-server, and return
    its exit code, the stderr after the signal, and the server's store and pid.

    The command makes its temporary folders in `temporary`.
    """
    env = dict(os.environ)
    # Ray makes its session folder in TMPDIR too, and the socket paths in it would
    # exceed the 107 bytes that Linux allows.
    env["RAY_TMPDIR"] = env.get("RAY_TMPDIR", tempfile.gettempdir())
    env["TMPDIR"] = str(temporary)
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, env=env
    )
    assert process.stderr is not None
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        match = None
        while match is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            match = _SERVER_STARTED.search(line)
        assert match is not None, f"{command} started no nats-server"
        process.send_signal(signum)
        rest = process.communicate(timeout=EXIT_TIMEOUT_S)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, rest, Path(match.group(1)), int(match.group(2))


def _check_suite_stops(tmp_path: Path, signum: signal.Signals) -> None:
    output = tmp_path / "quick.md"
    saved = tmp_path / "results.pickle"
    command = [
        *(sys.executable, "-m", "benchmarks.suite", "--quick"),
        *("--output", str(output), "--save-results", str(saved)),
    ]
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    code, stderr, store, server_pid = _signal_in_run(command, signum, temporary)
    assert code == 128 + signum.value, stderr[-4000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"python -m benchmarks.suite: interrupted by {signum.name}; no report or "
        "results were written"
    )
    assert process_gone(server_pid)
    assert store.parent == temporary
    assert list(temporary.iterdir()) == []
    assert not output.exists()
    assert not saved.exists()


def test_suite_sigterm_cleans_up(tmp_path: Path) -> None:
    _check_suite_stops(tmp_path, signal.SIGTERM)


def test_suite_sigint_prints_one_line(tmp_path: Path) -> None:
    _check_suite_stops(tmp_path, signal.SIGINT)


def test_faults_sigterm_cleans_up(tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "benchmarks.faults", "--quick"),
        *("--rounds", "1", "--kinds", "process"),
    ]
    code, stderr, store, server_pid = _signal_in_run(command, signal.SIGTERM, tmp_path)
    assert code == 128 + signal.SIGTERM.value, stderr[-4000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "python -m benchmarks.faults: interrupted by SIGTERM"
    )
    assert process_gone(server_pid)
    assert store.is_relative_to(tmp_path)
    assert list(tmp_path.iterdir()) == []

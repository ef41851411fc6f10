"""Settings from PLANTSTREAM_* variables: a value that cannot work stops the start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from actors.settings import StateSettings
from pipeline.settings import PipelineSettings

REPO_ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """Return a loopback port that nothing listens on once this returns."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("raw", ["inf", "nan", "-1"])
def test_state_seconds_must_be_finite(raw: str) -> None:
    with pytest.raises(ValueError, match="PLANTSTREAM_MAX_FUTURE_S") as caught:
        StateSettings.from_env({"PLANTSTREAM_MAX_FUTURE_S": raw})

    assert "finite number of seconds" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("PLANTSTREAM_CHECKPOINT_INTERVAL_S", "-1"),
        ("PLANTSTREAM_CHECKPOINT_INTERVAL_S", "0"),
        ("PLANTSTREAM_ACK_WAIT_S", "inf"),
        ("PLANTSTREAM_FETCH_BATCH", "0"),
    ],
)
def test_pipeline_setting_out_of_range(name: str, raw: str) -> None:
    with pytest.raises(ValueError, match=f"{name}={raw!r} is invalid"):
        PipelineSettings.from_env({name: raw})


def test_valid_settings_are_kept() -> None:
    state = StateSettings.from_env({"PLANTSTREAM_PARK_TIMEOUT_S": "60"})
    pipeline = PipelineSettings.from_env({"PLANTSTREAM_CHECKPOINT_INTERVAL_S": "0.5"})

    assert (state.park_timeout_s, pipeline.checkpoint_interval_s) == (60.0, 0.5)


def test_run_stops_on_infinite_setting(tmp_path: Path) -> None:
    # Nothing listens on the port: the settings must be checked before any connection.
    environ = {**os.environ, "PLANTSTREAM_MAX_FUTURE_S": "inf"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "run",
            "--until-drained",
            "--nats-url",
            f"nats://127.0.0.1:{closed_port()}",
            "--db",
            str(tmp_path / "x.duckdb"),
        ],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 2
    assert "PLANTSTREAM_MAX_FUTURE_S='inf' is invalid" in completed.stderr


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("PLANTSTREAM_ACK_WAIT_S", "1e300"),
        ("PLANTSTREAM_EVENTS_MAX_AGE_S", "1e12"),
        ("PLANTSTREAM_POSTINGS_DUPLICATE_WINDOW_S", "1e-12"),
        ("PLANTSTREAM_MAX_UNACKED", "1000000000000000000000"),
        ("PLANTSTREAM_CONSUMER", "a.b"),
        ("PLANTSTREAM_CONSUMER", ""),
    ],
)
def test_pipeline_setting_beyond_server_limits(name: str, raw: str) -> None:
    # Each of these passed the settings and failed later at the server, with a
    # traceback or a start retried for ever.
    with pytest.raises(ValueError, match=f"{name}={raw!r} is invalid"):
        PipelineSettings.from_env({name: raw})


def test_events_window_within_max_age() -> None:
    with pytest.raises(ValueError, match="PLANTSTREAM_EVENTS_DUPLICATE_WINDOW_S"):
        PipelineSettings.from_env(
            {
                "PLANTSTREAM_EVENTS_MAX_AGE_S": "60",
                "PLANTSTREAM_EVENTS_DUPLICATE_WINDOW_S": "120",
            }
        )

"""Settings from PLANTSTREAM_* variables: a value that cannot work stops the start."""

from __future__ import annotations

import dataclasses
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
    completed = _run_with(tmp_path, {"PLANTSTREAM_MAX_FUTURE_S": "inf"})

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


def numeric_variables(cls: type) -> list[tuple[type, str, str]]:
    """Return (class, variable, expected form) for each int and float field."""
    forms = {"int": "a whole number", "float": "a number"}
    cases = []
    for field in dataclasses.fields(cls):
        type_name = field.type if isinstance(field.type, str) else field.type.__name__
        if type_name in forms:
            name = f"PLANTSTREAM_{field.name.upper()}"
            cases.append((cls, name, forms[type_name]))
    return cases


@pytest.mark.parametrize(
    ("cls", "name", "form"),
    numeric_variables(PipelineSettings) + numeric_variables(StateSettings),
)
def test_setting_not_a_number(cls: type, name: str, form: str) -> None:
    # Without the check, the message ended in Python's "invalid literal for int()"
    # and did not name the expected form.
    with pytest.raises(ValueError) as caught:
        cls.from_env({name: "abc"})  # type: ignore[attr-defined]

    message = str(caught.value)
    assert f"environment variable {name}='abc' is not {form}" in message
    assert "(the default), or unset it" in message
    assert "invalid literal" not in message


@pytest.mark.parametrize("raw", ["P 01", "P01,P.2", "P01,P>"])
def test_sites_names_variable(raw: str) -> None:
    with pytest.raises(ValueError) as caught:
        PipelineSettings.from_env({"PLANTSTREAM_SITES": raw})

    message = str(caught.value)
    assert f"PLANTSTREAM_SITES={raw!r} is invalid" in message
    assert "separate them with commas, e.g. P01,P02" in message


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("P01", "is not PLANT=Area/City"),
        ("P01=Mars/Base", "'Mars/Base' is not an IANA time zone name"),
    ],
)
def test_plant_timezones_names_variable(raw: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        StateSettings.from_env({"PLANTSTREAM_PLANT_TIMEZONES": raw})

    message = str(caught.value)
    assert f"PLANTSTREAM_PLANT_TIMEZONES={raw!r} is invalid" in message
    assert problem in message


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("PLANTSTREAM_FETCH_BATCH", "abc", "is not a whole number"),
        ("PLANTSTREAM_SITES", "P 01", "plant id 'P 01', which cannot be a NATS"),
    ],
)
def test_run_names_bad_variable(
    tmp_path: Path, name: str, raw: str, expected: str
) -> None:
    # Nothing listens on the port: the settings must be checked before any connection.
    completed = _run_with(tmp_path, {name: raw})

    assert completed.returncode == 2, completed.stderr[-2000:]
    assert f"environment variable {name}={raw!r}" in completed.stderr
    assert expected in completed.stderr
    assert "Traceback" not in completed.stderr


def _run_with(
    tmp_path: Path, variables: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run `plantstream run` with extra environment variables, against a closed port."""
    return subprocess.run(
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
        env={**os.environ, **variables},
        capture_output=True,
        text=True,
        timeout=60,
    )

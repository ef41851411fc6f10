"""Shared fixtures: the real data files, a real nats-server and a local Ray instance."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from cluster.job import connect_ray
from cluster.nats_server import EmbeddedNatsServer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder with the public data files: AI4I 2020, SECOM labels and B2MML examples.

    Set PLANTSTREAM_DATA to its path; by default it is `shared/data` beside the
    checkout.
    """
    path = Path(
        os.environ.get("PLANTSTREAM_DATA", REPO_ROOT.parent / "shared" / "data")
    )
    if not (path / "ai4i2020.csv").is_file():
        pytest.fail(
            f"data folder {path} has no ai4i2020.csv; set PLANTSTREAM_DATA to the "
            "folder holding the AI4I 2020, SECOM and B2MML files (README, Real input)"
        )
    return path


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """A real nats-server with JetStream on a free loopback port and a temp store."""
    server = EmbeddedNatsServer(store_dir=tmp_path / "jetstream").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray instance shared by the whole session; starting one takes seconds."""
    connect_ray(None)
    yield
    ray.shutdown()

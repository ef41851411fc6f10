"""The fault harness in short: two faults of each kind lose and double nothing."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.faults import FAULT_KINDS, HarnessConfig, KindResult, run_harness

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_fault_loses_and_doubles_nothing(kind: str) -> None:
    config = HarnessConfig(
        rounds=2, kinds=(kind,), orders_per_plant=60, faults_per_stream=2
    )
    [result] = asyncio.run(run_harness(config))
    assert isinstance(result, KindResult)
    assert result.faults == 2
    assert result.hangs == 0
    assert result.db_open_failures == 0
    assert result.total("lost") == 0
    assert result.total("applied_twice") == 0
    assert result.total("duplicate_postings") == 0
    assert result.total("postings_not_in_db") == 0
    assert result.total("db_rows_not_posted") == 0
    assert all(stream.movements_match for stream in result.streams)
    assert len(result.recoveries_s) == 2

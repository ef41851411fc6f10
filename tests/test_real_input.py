"""The main job on the real AI4I 2020, SECOM and B2MML files, end to end."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from cluster.cli import _iter_file_messages
from cluster.job import JobConfig, JobResult, run_job
from cluster.nats_server import EmbeddedNatsServer

pytestmark = pytest.mark.usefixtures("ray_local")


def _inputs(data_dir: Path) -> list[Path]:
    return [
        data_dir / "ai4i2020.csv",
        data_dir / "secom_labels.data",
        data_dir / "b2mml",
    ]


def _run(paths: list[Path], db: Path) -> JobResult:
    with EmbeddedNatsServer(store_dir=db.parent / f"{db.stem}-js") as server:
        config = JobConfig(db=db, partitions=2, nats_url=server.url)
        return asyncio.run(run_job(config, list(_iter_file_messages(paths))))


@pytest.fixture(scope="module")
def real_db(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("real") / "real.duckdb"
    _run(_inputs(data_dir), db)
    return db


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db), read_only=True) as connection:
        return connection.execute(sql).fetchall()


def test_ai4i_units_and_failures(real_db: Path) -> None:
    [(units, scrap)] = query(
        real_db,
        "SELECT sum(good_quantity + scrap_quantity), sum(scrap_quantity) "
        "FROM production WHERE plant = 'AI4I'",
    )
    assert units == Decimal(10_000)
    assert scrap == Decimal(339)
    [(failures,)] = query(
        real_db,
        "SELECT count(*) FROM machine_states WHERE plant = 'AI4I' AND state = 'down' "
        "AND NOT planned AND ended_at IS NOT NULL",
    )
    assert failures == 339


def test_ai4i_oee_in_range(real_db: Path) -> None:
    [(availability, performance, quality, oee)] = query(
        real_db,
        "SELECT availability, performance, quality, oee FROM oee WHERE plant = 'AI4I'",
    )
    assert 0 < availability < 1
    assert 0 < performance <= 1
    assert quality == pytest.approx(9661 / 10000)
    assert oee == pytest.approx(availability * performance * quality)


def test_secom_inspections_and_holds(real_db: Path) -> None:
    [(total, failed)] = query(
        real_db,
        "SELECT count(*), count(*) FILTER (WHERE result = 'fail') FROM inspections "
        "WHERE plant = 'SECOM'",
    )
    assert total == 1567
    assert failed == 104
    [(holds,)] = query(real_db, "SELECT count(*) FROM holds WHERE plant = 'SECOM'")
    assert holds == 104
    [(transfers, stock)] = query(
        real_db,
        "SELECT count(*), sum(quantity) FROM postings WHERE plant = 'SECOM' "
        "AND movement_type = '344' AND stock_type = 'blocked'",
    )
    assert transfers == 104
    assert stock == Decimal(104)


def test_b2mml_order_and_components(real_db: Path) -> None:
    components = dict(
        query(
            real_db,
            "SELECT material, standard_quantity FROM order_components "
            "WHERE plant = 'B2MML' AND order_id = '258456'",
        )
    )
    assert components == {
        "CRBN0001": Decimal(816),
        "CRBN0002": Decimal(50),
        "CRBN0003": Decimal(100),
    }
    [(material, planned, uom)] = query(
        real_db,
        "SELECT material, planned_quantity, uom FROM orders WHERE order_id = '258456'",
    )
    assert (material, planned, uom) == ("SO1215", Decimal(1), "KG")


def test_b2mml_unknown_order_kept(real_db: Path) -> None:
    """The performance message names an order no schedule released: parked, not lost."""
    parked = query(
        real_db,
        "SELECT order_id, event_type, status FROM parked_events WHERE plant = 'B2MML'",
    )
    assert parked == [("53107", "material_consumed", "parked")]


def test_same_input_twice_same_postings(
    data_dir: Path, real_db: Path, tmp_path: Path
) -> None:
    twice = tmp_path / "twice.duckdb"
    result = _run(_inputs(data_dir) + _inputs(data_dir), twice)
    assert result.totals["duplicates"] > 20_000
    once_keys = query(real_db, "SELECT key, quantity FROM postings ORDER BY key")
    twice_keys = query(twice, "SELECT key, quantity FROM postings ORDER BY key")
    assert twice_keys == once_keys

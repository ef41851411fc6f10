"""Builders and a runner shared by the semantics scenario tests; it contains no tests.

A scenario is a list of (subject, bytes) messages. `run` publishes them to a real
nats-server, runs the whole job on the local Ray instance and returns the DuckDB path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from actors.settings import StateSettings
from cluster.job import JobConfig, JobResult, run_job
from cluster.nats_server import EmbeddedNatsServer
from cluster.reconcile import Difference, reconcile
from contracts import events as ev
from contracts.codec import encode
from pipeline.settings import PipelineSettings
from pipeline.subjects import event_subject

CET = dt.timezone(dt.timedelta(hours=1))
T0 = dt.datetime(2026, 3, 2, 8, 0, tzinfo=CET)

Message = tuple[str, bytes]


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def qty(value: str, uom: str = "EA") -> ev.Quantity:
    return ev.Quantity(Decimal(value), uom)


def base(event_id: str, minutes: float, order: str | None, plant: str = "P1") -> dict:
    return {
        "event_id": event_id,
        "plant": plant,
        "occurred_at": at(minutes),
        "source": "mes",
        "order": order,
    }


def release(
    order: str,
    *,
    material: str = "FG-1",
    uom: str = "EA",
    components: list[ev.Component] | None = None,
    work_center: str = "M1",
    minutes: float = 0,
    plant: str = "P1",
) -> ev.WorkOrderReleased:
    return ev.WorkOrderReleased(
        **base(f"{order}-rel", minutes, order, plant),
        material=material,
        quantity=qty("100", uom),
        components=components
        if components is not None
        else [ev.Component(material="RM-1", quantity=qty("50", "KG"))],
        operations=[
            ev.OperationSpec(
                operation="10", work_center=work_center, ideal_cycle_time_s=Decimal(30)
            )
        ],
    )


def confirm(
    event_id: str,
    order: str,
    good: str,
    *,
    minutes: float = 10,
    lot: str | None = None,
    uom: str = "EA",
    plant: str = "P1",
    **kw: Any,
) -> ev.ProductionConfirmed:
    return ev.ProductionConfirmed(
        **base(event_id, minutes, order, plant),
        good=qty(good, uom),
        operation="10",
        lot=lot,
        **kw,
    )


def consume(
    event_id: str,
    order: str,
    amount: str,
    uom: str = "KG",
    *,
    material: str = "RM-1",
    minutes: float = 5,
) -> ev.MaterialConsumed:
    return ev.MaterialConsumed(
        **base(event_id, minutes, order),
        material=material,
        quantity=qty(amount, uom),
    )


def hold(
    event_id: str,
    hold_id: str,
    order: str | None,
    *,
    scope: str = "order",
    lot: str | None = None,
    material: str | None = None,
    minutes: float = 20,
) -> ev.QualityHoldApplied:
    return ev.QualityHoldApplied(
        **base(event_id, minutes, order),
        hold_id=hold_id,
        scope=scope,  # type: ignore[arg-type]
        lot=lot,
        material=material,
    )


def unhold(
    event_id: str, hold_id: str, order: str | None, *, minutes: float = 30
) -> ev.QualityHoldReleased:
    return ev.QualityHoldReleased(**base(event_id, minutes, order), hold_id=hold_id)


def message(event: ev.PlantEvent) -> Message:
    return event_subject(event.plant, str(event.__struct_config__.tag)), encode(event)


def messages(*events: ev.PlantEvent) -> list[Message]:
    return [message(event) for event in events]


def run(
    server: EmbeddedNatsServer,
    db: Path,
    inputs: list[Message],
    *,
    state: StateSettings | None = None,
    partitions: int = 3,
) -> JobResult:
    """Publish `inputs` and run the job until the events stream is drained."""
    config = JobConfig(
        db=db,
        partitions=partitions,
        nats_url=server.url,
        pipeline=PipelineSettings(fetch_batch=200, checkpoint_interval_s=0.2),
        state=state or StateSettings(),
    )
    return asyncio.run(run_job(config, inputs))


def run_on_own_server(
    folder: Path, inputs: list[Message], *, state: StateSettings | None = None
) -> tuple[Path, JobResult]:
    """Run a scenario on a nats-server of its own, for module-scoped fixtures that share
    one run between several tests; `nats_server` in conftest is per test."""
    server = EmbeddedNatsServer(store_dir=folder / "jetstream").start()
    try:
        db = folder / "out.duckdb"
        return db, run(server, db, inputs, state=state)
    finally:
        server.stop()


def query(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db), read_only=True) as connection:
        connection.execute("SET TimeZone = 'UTC'")
        return connection.execute(sql, list(params)).fetchall()


def movements(db: Path, order: str) -> list[tuple[str, str, Decimal]]:
    """Return (movement type, stock type, quantity) of an order's goods movements."""
    return sorted(
        query(
            db,
            "SELECT movement_type, stock_type, quantity FROM postings "
            "WHERE posting_type = 'goods_movement' AND order_id = ?",
            order,
        )
    )


def movement_totals(db: Path) -> dict[tuple[str, str, str], object]:
    """Return the posted quantity per (plant, material, movement type)."""
    with duckdb.connect(str(db), read_only=True) as connection:
        rows = connection.execute(
            "SELECT plant, material, movement_type, sum(quantity) FROM postings "
            "WHERE posting_type = 'goods_movement' GROUP BY ALL"
        ).fetchall()
    return {(plant, material, kind): total for plant, material, kind, total in rows}


def order_stock(db: Path) -> dict[tuple[str, str, str], Decimal]:
    """Return the net stock per (order, material, stock type) the postings imply."""
    rows = query(
        db,
        """
        SELECT order_id, material, stock_type, sum(delta) FROM (
            SELECT order_id, material, stock_type, quantity AS delta
            FROM postings WHERE movement_type IN ('101', '344')
            UNION ALL
            SELECT order_id, material, stock_type, -quantity
            FROM postings WHERE movement_type = '102'
            UNION ALL
            SELECT order_id, material, 'unrestricted', -quantity
            FROM postings WHERE movement_type IN ('261', '344')
            UNION ALL
            SELECT order_id, material, 'unrestricted', quantity
            FROM postings WHERE movement_type IN ('262', '343')
            UNION ALL
            SELECT order_id, material, 'blocked', -quantity
            FROM postings WHERE movement_type = '343'
        )
        GROUP BY ALL
        """,
    )
    return {(o, m, s): q for o, m, s, q in rows if q != 0}


def differences(db: Path) -> list[Difference]:
    with duckdb.connect(str(db), read_only=True) as connection:
        return reconcile(connection)

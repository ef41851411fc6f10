"""Reversals: one exact inverse per original, however often the reversal arrives."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from test_semantics_support import (
    base,
    confirm,
    consume,
    differences,
    message,
    messages,
    query,
    release,
    run_on_own_server,
)

from contracts import events as ev


@pytest.fixture(scope="module")
def db(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cancel = ev.ProductionCancelled(**base("x1", 20, "O1"), cancels_event_id="c1")
    reverse = ev.ConsumptionReversed(**base("r1", 21, "O1"), reverses_event_id="i1")
    inputs = [
        *messages(release("O1"), confirm("c1", "O1", "10"), consume("i1", "O1", "3")),
        message(cancel),
        message(cancel),  # redelivered
        message(ev.ProductionCancelled(**base("x2", 22, "O1"), cancels_event_id="c1")),
        message(reverse),
        message(reverse),
        message(ev.ConsumptionReversed(**base("r2", 23, "O1"), reverses_event_id="i1")),
        # A reversal that names the report, and a cancellation that names the issue.
        message(ev.ConsumptionReversed(**base("r3", 24, "O1"), reverses_event_id="c1")),
        message(ev.ProductionCancelled(**base("x3", 25, "O1"), cancels_event_id="i1")),
    ]
    path, _ = run_on_own_server(tmp_path_factory.mktemp("reversals"), inputs)
    return path


def _posting(db: Path, movement: str) -> list[tuple[object, ...]]:
    return query(
        db,
        "SELECT key, quantity, reverses, lineage FROM postings "
        "WHERE movement_type = ? ORDER BY key",
        movement,
    )


def test_receipt_reversed_once(db: Path) -> None:
    [(receipt_key, received, _, _)] = _posting(db, "101")
    [(_, reversed_quantity, reverses, lineage)] = _posting(db, "102")
    assert reversed_quantity == received == Decimal(10)
    assert reverses == receipt_key
    assert lineage == ["x1", "c1"]


def test_confirmation_reversed_once(db: Path) -> None:
    rows = query(
        db,
        "SELECT key, reverses, yield_quantity FROM postings "
        "WHERE posting_type = 'order_confirmation' ORDER BY reverses NULLS FIRST",
    )
    assert len(rows) == 2
    (original, _, yielded), (_, reverses, taken_back) = rows
    assert reverses == original
    assert taken_back == yielded


def test_issue_reversed_once(db: Path) -> None:
    [(issue_key, issued, _, _)] = _posting(db, "261")
    [(_, returned, reverses, lineage)] = _posting(db, "262")
    assert returned == issued == Decimal(3)
    assert reverses == issue_key
    assert lineage == ["r1", "i1"]


def test_reversed_order_nets_zero(db: Path) -> None:
    assert query(db, "SELECT good_quantity FROM orders") == [(0,)]
    assert query(db, "SELECT actual_quantity FROM order_components") == [(0,)]
    assert query(db, "SELECT quantity FROM stock WHERE quantity <> 0") == []
    assert differences(db) == []


def _outcome(db: Path, event_id: str) -> tuple[str, str | None]:
    [row] = query(db, "SELECT status, reason FROM events WHERE event_id = ?", event_id)
    return row


def _detail(db: Path, event_id: str) -> str:
    [(detail,)] = query(
        db, "SELECT detail FROM dead_letters WHERE event_id = ?", event_id
    )
    return detail


def test_second_reversal_not_applied(db: Path) -> None:
    assert _outcome(db, "x2") == ("dead_letter", "unmatched")
    assert _outcome(db, "r2") == ("dead_letter", "unmatched")
    assert "which event x1 took back already" in _detail(db, "x2")
    assert "which event r1 took back already" in _detail(db, "r2")


def test_reversal_query_counts_each_original_once(db: Path) -> None:
    # The query of docs/analytics.md, "The events ledger".
    rows = query(
        db,
        """
        SELECT r.event_id, o.quantity
        FROM events AS r
        JOIN events AS o
          ON o.plant = r.plant AND o.event_id = r.refers_to AND o.status = 'applied'
        WHERE r.status = 'applied' AND r.refers_to IS NOT NULL
        ORDER BY r.event_id
        """,
    )
    assert rows == [("r1", Decimal(3)), ("x1", Decimal(10))]


def test_reversal_of_wrong_kind_dead_lettered(db: Path) -> None:
    assert _outcome(db, "r3") == ("dead_letter", "unmatched")
    assert _outcome(db, "x3") == ("dead_letter", "unmatched")
    assert "names event c1, which is a production_confirmed event" in _detail(db, "r3")
    assert "names event i1, which is a material_consumed event" in _detail(db, "x3")
    assert query(db, "SELECT event_id FROM parked_events") == []

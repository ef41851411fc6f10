"""Units and decimals: exact from wire to posting, converted and rounded once."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from test_semantics_support import (
    base,
    consume,
    differences,
    messages,
    qty,
    query,
    release,
    run_on_own_server,
)

from actors.orders import _unit_mismatch_detail
from contracts import events as ev
from pipeline.subjects import event_subject

# JSON numbers, not strings: they must reach the posting digit for digit.
NUMBER_MESSAGES = [
    (
        event_subject("P1", "material_consumed"),
        b'{"event_type":"material_consumed","event_id":"n1","plant":"P1",'
        b'"occurred_at":"2026-03-02T08:05:00+01:00","source":"mes","order":"O1",'
        b'"material":"RM-1","quantity":{"value":0.1,"uom":"KG"}}',
    ),
    (
        event_subject("P1", "material_consumed"),
        b'{"event_type":"material_consumed","event_id":"n2","plant":"P1",'
        b'"occurred_at":"2026-03-02T08:06:00+01:00","source":"mes","order":"O1",'
        b'"material":"RM-1","quantity":{"value":1234.567890123,"uom":"KG"}}',
    ),
]


@pytest.fixture(scope="module")
def db(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bom = [
        ev.Component(material="RM-1", quantity=qty("50", "KG")),
        ev.Component(material="RM-2", quantity=qty("10", "LB")),
        ev.Component(material="RM-3", quantity=qty("5", "EA")),
    ]
    inputs = [
        *messages(
            release("O1", components=bom),
            consume("g1", "O1", "1234.5678", "G"),
            consume("mg1", "O1", "0.0025", "MG"),
            consume("kg1", "O1", "1", "KG", material="RM-2"),
            ev.ConsumptionReversed(**base("r1", 30, "O1"), reverses_event_id="kg1"),
            consume("bad1", "O1", "2", "KG", material="RM-3"),
            consume("lower1", "O1", "2", "kg"),
            consume("lower2", "O1", "2", "g"),
        ),
        *NUMBER_MESSAGES,
    ]
    path, _ = run_on_own_server(tmp_path_factory.mktemp("units"), inputs)
    return path


def _issued(db: Path, reference: str) -> tuple[Decimal, str]:
    [row] = query(
        db,
        "SELECT quantity, uom FROM postings WHERE movement_type = '261' "
        "AND reference = ?",
        reference,
    )
    return row


def test_json_number_exact(db: Path) -> None:
    assert _issued(db, "n1") == (Decimal("0.1"), "KG")
    assert _issued(db, "n2") == (Decimal("1234.567890123"), "KG")


def test_grams_posted_in_bom_unit(db: Path) -> None:
    assert _issued(db, "g1") == (Decimal("1.2345678"), "KG")


def test_conversion_rounds_half_even(db: Path) -> None:
    # 0.0025 MG is 0.0000000025 KG: half way between two 9-place values, to the even.
    assert _issued(db, "mg1") == (Decimal("0.000000002"), "KG")
    # 1 KG is 2.2046226218487757... LB: the full-precision factor, rounded once.
    assert _issued(db, "kg1") == (Decimal("2.204622622"), "LB")


def test_converted_reversal_exact(db: Path) -> None:
    [(quantity, uom)] = query(
        db, "SELECT quantity, uom FROM postings WHERE movement_type = '262'"
    )
    assert (quantity, uom) == (Decimal("2.204622622"), "LB")


def test_other_dimension_dead_lettered(db: Path) -> None:
    [(reason, detail)] = query(
        db, "SELECT reason, detail FROM dead_letters WHERE event_id = 'bad1'"
    )
    assert reason == "invalid"
    assert "KG" in detail
    assert "EA" in detail


def test_lower_case_unit_named(db: Path) -> None:
    rows = query(
        db,
        "SELECT event_id, reason, detail FROM dead_letters "
        "WHERE event_id LIKE 'lower%' ORDER BY event_id",
    )
    [(_, same_reason, same_unit), (_, other_reason, other_unit)] = rows
    assert same_reason == "invalid"
    assert "unit codes are case-sensitive" in same_unit
    assert "report it in KG" in same_unit
    assert "no conversion" not in same_unit
    assert other_reason == "invalid"
    assert "unit codes are case-sensitive" in other_unit
    assert "report it in G, which plantstream converts to KG" in other_unit


def test_component_actuals_exact(db: Path) -> None:
    actual = dict(query(db, "SELECT material, actual_quantity FROM order_components"))
    assert actual["RM-1"] == Decimal("1.2345678") + Decimal("0.000000002") + Decimal(
        "0.1"
    ) + Decimal("1234.567890123")
    assert actual["RM-2"] == 0
    assert differences(db) == []


def test_unit_with_space_quoted() -> None:
    detail = _unit_mismatch_detail("EA ", "EA", "good quantity")
    assert "is in 'EA '" in detail
    assert "white space" in detail

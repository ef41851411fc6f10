"""Quality gating through the pipeline: holds block received stock, releases free it."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_semantics_support import (
    confirm,
    differences,
    hold,
    messages,
    movements,
    query,
    release,
    run_on_own_server,
    unhold,
)


@pytest.fixture(scope="module")
def db(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    inputs = messages(
        # Order hold before the receipt: the receipt goes to blocked stock.
        release("O1"),
        hold("h1", "H1", "O1", minutes=5),
        confirm("c1", "O1", "10"),
        # Order hold after the receipt, then its release: 344, then 343.
        release("O2"),
        confirm("c2", "O2", "8"),
        hold("h2", "H2", "O2"),
        unhold("u2", "H2", "O2"),
        # A lot hold without an order blocks that lot in every order of the plant.
        release("O3"),
        confirm("c3", "O3", "6", lot="L3"),
        confirm("c3b", "O3", "4", lot="L3X"),
        hold("hl", "HL", None, scope="lot", lot="L3"),
        # A material hold without an order, also on an order released while it is
        # active, and its release.
        release("O4", material="FG-4"),
        confirm("c4", "O4", "9"),
        hold("hm", "HM", None, scope="material", material="FG-4"),
        release("O5", material="FG-4"),
        confirm("c5", "O5", "2"),
        unhold("um", "HM", None),
    )
    path, _ = run_on_own_server(tmp_path_factory.mktemp("quality"), inputs)
    return path


def test_receipt_under_hold_blocked(db: Path) -> None:
    assert movements(db, "O1") == [("101", "blocked", 10)]


def test_hold_after_receipt_transfers(db: Path) -> None:
    assert movements(db, "O2") == [
        ("101", "unrestricted", 8),
        ("343", "unrestricted", 8),
        ("344", "blocked", 8),
    ]


def test_lot_hold_blocks_its_lot(db: Path) -> None:
    assert movements(db, "O3") == [
        ("101", "unrestricted", 4),
        ("101", "unrestricted", 6),
        ("344", "blocked", 6),
    ]


def test_material_hold_plant_wide(db: Path) -> None:
    assert movements(db, "O4") == [
        ("101", "unrestricted", 9),
        ("343", "unrestricted", 9),
        ("344", "blocked", 9),
    ]
    assert movements(db, "O5") == [
        ("101", "blocked", 2),
        ("343", "unrestricted", 2),
    ]


def test_hold_status_and_reconcile(db: Path) -> None:
    status = dict(query(db, "SELECT order_id, status FROM orders"))
    assert status == {
        "O1": "on_hold",
        "O2": "in_progress",
        "O3": "on_hold",
        "O4": "in_progress",
        "O5": "in_progress",
    }
    assert differences(db) == []

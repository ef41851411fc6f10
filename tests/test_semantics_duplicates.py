"""Duplicates and reused event ids, through the real pipeline."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from test_semantics_support import (
    confirm,
    consume,
    differences,
    message,
    messages,
    movements,
    query,
    release,
    run,
)

from actors.settings import StateSettings
from cluster.nats_server import EmbeddedNatsServer
from contracts.codec import encode

pytestmark = pytest.mark.usefixtures("ray_local")


def test_duplicates_applied_once(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "out.duckdb"
    report = confirm("O1-c1", "O1", "10")
    issue = consume("O1-i1", "O1", "2.5")
    subject, data = message(report)
    filler = [consume(f"O1-f{n}", "O1", "1") for n in range(8)]
    inputs = [
        *messages(release("O1"), report),
        (subject, data),  # redelivered on the same subject
        (subject.replace("production_confirmed", "production-confirmed"), data),
        *messages(issue, *filler),
        # Replayed after the partition's id memory (5 ids) has forgotten both: the
        # order still knows its own events.
        message(report),
        message(issue),
    ]
    result = run(nats_server, db, inputs, state=StateSettings(dedup_max_ids=5))

    assert result.report.counts["duplicates"] == 4
    assert result.report.counts["applied"] == 11
    assert movements(db, "O1").count(("101", "unrestricted", Decimal(10))) == 1
    issued = query(db, "SELECT count(*) FROM postings WHERE reference = 'O1-i1'")
    assert issued == [(1,)]
    assert query(db, "SELECT good_quantity FROM orders") == [(10,)]
    assert differences(db) == []


def test_reused_id_dead_lettered(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "out.duckdb"
    first = confirm("O1-c1", "O1", "10")
    reused = confirm("O1-c1", "O1", "12")
    inputs = messages(release("O1"), first, reused)
    result = run(nats_server, db, inputs)

    assert result.report.dead_letters == {"reused_id": 1}
    letters = query(db, "SELECT event_id, detail, data FROM dead_letters")
    assert len(letters) == 1
    event_id, detail, data = letters[0]
    assert event_id == "O1-c1"
    assert detail.count("hash") == 2
    assert data == encode(reused)
    assert movements(db, "O1") == [("101", "unrestricted", 10)]
    ledger = query(
        db, "SELECT status, reason FROM events WHERE event_id = 'O1-c1' ORDER BY 1"
    )
    assert ledger == [("applied", None), ("dead_letter", "reused_id")]
    assert differences(db) == []

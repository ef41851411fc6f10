"""ERP postings: the goods movements and order confirmations plantstream publishes.

Movement types follow SAP's numbering, which most ERP posting consumers already map:
101/102 goods receipt for an order and its reversal, 261/262 goods issue to an order and
its reversal, 344 transfer from unrestricted to blocked stock and 343 back.

Every posting carries `key`, a deterministic idempotency key built from the source event
ids, so a posting recomputed after a crash or a replay has the same key as the first
time. The postings stream deduplicates on it (it is the Nats-Msg-Id), and consumers can
rely on it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

__all__ = [
    "GOODS_ISSUE",
    "GOODS_ISSUE_REVERSAL",
    "GOODS_RECEIPT",
    "GOODS_RECEIPT_REVERSAL",
    "TO_BLOCKED",
    "FROM_BLOCKED",
    "GoodsMovement",
    "OrderConfirmation",
    "Posting",
    "posting_key",
]

GOODS_RECEIPT = "101"
GOODS_RECEIPT_REVERSAL = "102"
GOODS_ISSUE = "261"
GOODS_ISSUE_REVERSAL = "262"
TO_BLOCKED = "344"
FROM_BLOCKED = "343"

PostedQuantity = Annotated[
    Decimal,
    msgspec.Meta(
        description="An exact decimal in plain notation, without an exponent or "
        'trailing zeros, such as "1000", "0.25" or "0.00000001"'
    ),
]
"""A quantity as `contracts.codec.encode_posting` writes it."""

MovementType = Literal["101", "102", "261", "262", "343", "344"]
StockType = Literal["unrestricted", "quality", "blocked"]


def posting_key(plant: str, kind: str, *parts: str) -> str:
    """Build a deterministic idempotency key from the facts that make a posting unique.

    The key is readable up to the hash, so an ERP team can see plant and kind at a
    glance: `P1-101-3f2a...`. The hash covers all parts, separated so that ("a", "bc")
    and ("ab", "c") differ.
    """
    digest = hashlib.blake2b(
        "\x1f".join((plant, kind, *parts)).encode(), digest_size=12
    ).hexdigest()
    return f"{plant}-{kind}-{digest}"


class GoodsMovement(
    msgspec.Struct,
    frozen=True,
    gc=False,
    kw_only=True,
    tag_field="posting_type",
    tag="goods_movement",
):
    """One goods movement item with the header fields an ERP needs to post it.

    `quantity` is always positive: the movement type gives the direction. `reverses` is
    the key of the posting that a reversal (102, 262) takes back. A 343 names none: it
    moves the whole blocked stock of a lot back, which several 344s may have put there.
    """

    key: str
    plant: str
    movement_type: MovementType
    material: str
    quantity: PostedQuantity
    uom: str
    stock_type: StockType
    order: str | None
    batch: str | None = None
    storage_location: str | None = None
    movement_indicator: Literal["F", ""] = "F"
    reason: str | None = None
    item_text: str | None = None
    posting_date: dt.date
    document_date: dt.date
    occurred_at: dt.datetime
    reference: str
    # A tuple, as befits a frozen struct. Once the cycle collector has seen that it
    # contains only strings it skips it, and a partition keeps thousands of postings.
    lineage: tuple[str, ...]
    reverses: str | None = None


class OrderConfirmation(
    msgspec.Struct,
    frozen=True,
    gc=False,
    kw_only=True,
    tag_field="posting_type",
    tag="order_confirmation",
):
    """A production order confirmation: yield, scrap and rework of one report."""

    key: str
    plant: str
    order: str
    operation: str | None
    work_center: str | None
    yield_quantity: PostedQuantity
    scrap_quantity: PostedQuantity
    rework_quantity: PostedQuantity
    uom: str
    final: bool
    started_at: dt.datetime | None
    finished_at: dt.datetime
    lineage: tuple[str, ...]
    reverses: str | None = None


Posting = GoodsMovement | OrderConfirmation

"""The wire contracts: decoding, validation, JSON Schema, keys, public names."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from decimal import Decimal
from typing import Annotated, Any, cast

import msgspec
import nats
import pyarrow as pa
import pytest

import contracts
from cluster.nats_server import EmbeddedNatsServer
from contracts.codec import (
    decode_edge_batch,
    decode_event,
    decode_posting,
    describe_decode_error,
    encode,
    encode_posting,
)
from contracts.dead_letters import (
    MAX_DETAIL_CHARS,
    MAX_NAME_CHARS,
    DeadLetter,
    shorten_letter,
)
from contracts.events import EVENT_TYPES, MaterialConsumed, shown_decimal
from contracts.keys import EventKey, check_no_nul, decode_key, routing_key
from contracts.postings import GoodsMovement, OrderConfirmation, posting_key
from contracts.schema import event_schema, posting_schema
from pipeline.settings import PipelineSettings
from pipeline.streams import ensure_streams, stream_configs
from pipeline.subjects import event_subject

CONSUMED = (
    b'{"event_type":"material_consumed","event_id":"e1","plant":"P1","order":"O1",'
    b'"occurred_at":"2026-03-01T07:15:00.1234567+05:30","source":"mes","material":"RM",'
    b'"quantity":{"value":QTY,"uom":"KG"}}'
)


def consumed(quantity: bytes) -> bytes:
    return CONSUMED.replace(b"QTY", quantity)


def test_public_surface() -> None:
    assert set(contracts.__all__) == {
        "EVENT_TYPES",
        "DeadLetter",
        "EventKey",
        "GoodsMovement",
        "OrderConfirmation",
        "PlantEvent",
        "Posting",
        "Quantity",
        "decode_event",
        "decode_key",
        "decode_posting",
        "encode",
        "routing_key",
    }


def test_json_number_exact() -> None:
    event = decode_event(consumed(b"9999999999.123456789"))
    assert isinstance(event, MaterialConsumed)
    assert event.quantity.value == Decimal("9999999999.123456789")


def test_trailing_zeros_past_nine_places_accepted() -> None:
    # They lose nothing at the tables' 9 places.
    event = decode_event(consumed(b'"5.000000000000"'))
    assert isinstance(event, MaterialConsumed)
    assert event.quantity.value == Decimal(5)


@pytest.mark.parametrize(
    "written",
    [b'"0E-999999999"', b"0e-999999999", b'"5.' + b"0" * 40 + b'"'],
)
def test_zeros_past_nine_places_stored_at_nine(written: bytes) -> None:
    # Arrow rejected 40 places for DECIMAL(38, 9) and crashed on the zero, so the
    # value is kept at the tables' scale. Its digits do not change.
    event = decode_event(consumed(written))
    assert isinstance(event, MaterialConsumed)
    _, _, exponent = event.quantity.value.as_tuple()
    assert exponent == -9
    pa.array([event.quantity.value], pa.decimal128(38, 9))


@pytest.mark.parametrize("written", [b'"0E+20"', b'"0E+999999999"', b"0e20"])
def test_zero_with_large_exponent_is_zero(written: bytes) -> None:
    event = decode_event(consumed(written))
    assert isinstance(event, MaterialConsumed)
    assert event.quantity.value == 0
    assert event.quantity.value.as_tuple().exponent == 0


def test_quantity_errors_write_the_value_in_plain_notation() -> None:
    with pytest.raises(msgspec.ValidationError, match="quantity 0.0000000001 has"):
        decode_event(consumed(b'"1E-10"'))
    with pytest.raises(msgspec.ValidationError, match="quantity 1000000000000000 has"):
        decode_event(consumed(b'"1E+15"'))


def test_quantity_below_decimal_context_rejected() -> None:
    # Decimal.normalize() rounded this to 0, so it passed and posted a receipt of 0.
    with pytest.raises(msgspec.ValidationError, match="quantity 1E-9999999 has more"):
        decode_event(consumed(b'"1e-9999999"'))
    zero = decode_event(consumed(b'"0E-9999999"'))
    assert isinstance(zero, MaterialConsumed)
    assert zero.quantity.value == 0


def test_offset_kept_and_seven_digit_fraction() -> None:
    event = decode_event(consumed(b'"1.5"'))
    assert event.occurred_at.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert event.occurred_at.astimezone(dt.UTC) == dt.datetime(
        2026, 3, 1, 1, 45, 0, 123457, tzinfo=dt.UTC
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (consumed(b'"NaN"'), "finite"),
        (consumed(b'"-1"'), "must not be negative"),
        (consumed(b'"1.0000000001"'), "decimal places"),
        (consumed(b'"1"').replace(b"+05:30", b""), "timezone"),
        (
            consumed(b'"1"').replace(b"material_consumed", b"coffee_brewed"),
            "event_type",
        ),
        (consumed(b'"1"').replace(b'"material":"RM",', b""), "material"),
        (consumed(b'"1000000000000000"'), "15 digits"),
        (
            consumed(b'"1"').replace(
                b"2026-03-01T07:15:00.1234567+05:30", b"0001-01-01T00:00:00+14:00"
            ),
            "before 1970",
        ),
        (
            consumed(b'"1"').replace(b"2026-03-01", b"1969-12-31"),
            "before 1970",
        ),
        (
            # 9999 at its offset, 10000 in UTC.
            consumed(b'"1"').replace(
                b"2026-03-01T07:15:00.1234567+05:30", b"9999-12-31T23:00:00-12:00"
            ),
            "after the last time that can be stored in UTC",
        ),
        (
            # 1970 at its offset, 1969 in UTC.
            consumed(b'"1"').replace(b"2026-03-01T07:15", b"1970-01-01T03:15"),
            "before 1970",
        ),
    ],
    ids=[
        "nan",
        "negative",
        "too_precise",
        "naive_time",
        "unknown_type",
        "missing_field",
        "too_large",
        "year_one",
        "before_1970",
        "after_9999_in_utc",
        "before_1970_in_utc",
    ],
)
def test_invalid_event_rejected(data: bytes, message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        decode_event(data)


def test_round_trip_keeps_decimals() -> None:
    event = decode_event(consumed(b"12.500"))
    assert b'"value":"12.500"' in encode(event)
    assert decode_event(encode(event)) == event


def test_key_decode_and_routing() -> None:
    key = decode_key(consumed(b'"1"'))
    assert key == EventKey("e1", "material_consumed", "P1", "O1")
    assert routing_key(key) == "order:O1"
    machine = EventKey("e2", "downtime_started", "P1", "O1", machine="M1")
    assert routing_key(machine) == "machine:M1"


_POSTED_AT = dt.datetime(2026, 1, 5, 6, 0, tzinfo=dt.UTC)


def _movement(quantity: Decimal) -> GoodsMovement:
    return GoodsMovement(
        key="P1-101-k",
        plant="P1",
        movement_type="101",
        material="FG-1",
        quantity=quantity,
        uom="KG",
        stock_type="unrestricted",
        order="O1",
        posting_date=_POSTED_AT.date(),
        document_date=_POSTED_AT.date(),
        occurred_at=_POSTED_AT,
        reference="e1",
        lineage=("e1",),
    )


@pytest.mark.parametrize(
    ("quantity", "written"),
    [
        ("0.00000001", b'"quantity":"0.00000001"'),
        ("1E-7", b'"quantity":"0.0000001"'),
        ("1E+3", b'"quantity":"1000"'),
        ("71.195000000", b'"quantity":"71.195"'),
        ("162.000000000", b'"quantity":"162"'),
        ("0E-9", b'"quantity":"0"'),
        ("12.5", b'"quantity":"12.5"'),
        ("-0", b'"quantity":"0"'),
    ],
)
def test_posted_quantity_in_plain_notation(quantity: str, written: bytes) -> None:
    data = encode_posting(_movement(Decimal(quantity)))
    assert written in data
    decoded = decode_posting(data)
    assert isinstance(decoded, GoodsMovement)
    assert decoded.quantity == Decimal(quantity)


def test_confirmed_quantities_in_plain_notation() -> None:
    confirmation = OrderConfirmation(
        key="P1-conf-k",
        plant="P1",
        order="O1",
        operation=None,
        work_center=None,
        yield_quantity=Decimal("1E+2"),
        scrap_quantity=Decimal("0.000000"),
        rework_quantity=Decimal("2"),
        uom="EA",
        final=True,
        started_at=None,
        finished_at=_POSTED_AT,
        lineage=("e1",),
    )
    data = encode_posting(confirmation)
    assert b'"yield_quantity":"100"' in data
    assert b'"scrap_quantity":"0"' in data
    assert b'"rework_quantity":"2"' in data


def test_posting_key_deterministic() -> None:
    first = posting_key("P1", "101", "e1")
    assert first == posting_key("P1", "101", "e1")
    assert first.startswith("P1-101-")
    assert posting_key("P1", "101", "ab", "c") != posting_key("P1", "101", "a", "bc")


def test_schemas_cover_catalog() -> None:
    schema = event_schema()
    defs = cast(dict[str, dict[str, Any]], schema["$defs"])
    tags = {
        d["properties"]["event_type"]["enum"][0]
        for d in defs.values()
        if "event_type" in d.get("properties", {})
    }
    assert tags == set(EVENT_TYPES)
    assert "GoodsMovement" in posting_schema()["$defs"]  # type: ignore[operator]


def test_schema_states_what_the_decoder_and_ingest_accept() -> None:
    defs: dict = event_schema()["$defs"]  # type: ignore[assignment]
    # The decoder reads a JSON number as exactly as a string.
    value = defs["Quantity"]["properties"]["value"]
    assert "number" in [option["type"] for option in value["anyOf"]]
    assert decode_event(consumed(b"12.5")).quantity.value == Decimal("12.5")  # type: ignore[union-attr]
    # The ingest dead-letters a plant that cannot be a subject token.
    pattern = re.compile(defs["MaterialConsumed"]["properties"]["plant"]["pattern"])
    assert pattern.fullmatch("P-01_a")
    assert not pattern.fullmatch("P 01")
    assert not pattern.fullmatch("P.01")
    # The partition rejects these without an order; a plant-wide hold names none.
    assert "order" in defs["ConsumptionReversed"]["required"]
    assert "order" in defs["WorkOrderReleased"]["required"]
    assert "order" not in defs["QualityHoldApplied"]["required"]
    assert "order" not in defs["MachineStateChanged"]["required"]
    # A null order is no order to the partition either.
    assert defs["ProductionConfirmed"]["properties"]["order"]["type"] == "string"
    # A hold of scope order, the default, needs its order too.
    hold = defs["QualityHoldApplied"]
    assert {"not": {"required": ["scope"]}} in hold["if"]["anyOf"]
    assert {"properties": {"scope": {"const": "order"}}} in hold["if"]["anyOf"]
    assert hold["then"]["required"] == ["order"]
    assert hold["then"]["properties"]["order"]["type"] == "string"


def test_schema_patterns_reject_what_the_decoder_rejects() -> None:
    schema = event_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    defs: dict = schema["$defs"]  # type: ignore[assignment]
    text = re.compile(defs["Quantity"]["properties"]["value"]["anyOf"][0]["pattern"])
    for good in ("12.500", "0", "123456789012345.123456789"):
        assert text.search(good), good
    for bad in ("1,5", "abc", "NaN", "-1", "1234567890123456", "0.1234567891", ""):
        assert not text.search(bad), bad
    time = re.compile(defs["MaterialConsumed"]["properties"]["occurred_at"]["pattern"])
    assert time.search("2026-03-01T07:15:00.1234567+05:30")
    assert time.search("2026-03-01T01:45:00Z")
    for bad in ("2026-03-01T07:15:00", "yesterday", "2026-03-01"):
        assert not time.search(bad), bad


def test_subject_rejects_bad_plant() -> None:
    with pytest.raises(ValueError, match="subject token"):
        event_subject("P1.x", "material_consumed")


def test_streams_created_idempotently(nats_server: EmbeddedNatsServer) -> None:
    async def create_twice() -> list[str]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js, PipelineSettings())
            await ensure_streams(js, PipelineSettings(postings_duplicate_window_s=60))
            info = await js.stream_info("ERP_POSTINGS")
            assert info.config.duplicate_window == 60
            return sorted([str(s.config.name) for s in await js.streams_info()])
        finally:
            await nc.close()

    names = asyncio.run(create_twice())
    expected = sorted(str(c.name) for c in stream_configs(PipelineSettings()))
    assert [n for n in names if not n.startswith("OBJ_")] == expected


def test_largest_quantity_accepted() -> None:
    event = decode_event(consumed(b'"999999999999999.999999999"'))
    assert isinstance(event, MaterialConsumed)
    assert event.quantity.value == Decimal("999999999999999.999999999")


def test_early_started_at_rejected() -> None:
    data = (
        b'{"event_type":"production_confirmed","event_id":"p1","plant":"P1",'
        b'"order":"O1","occurred_at":"2026-03-01T07:15:00Z","source":"mes",'
        b'"good":{"value":"1","uom":"EA"},"started_at":"0001-01-01T00:00:00+14:00"}'
    )
    with pytest.raises(msgspec.ValidationError, match="started_at"):
        decode_event(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (consumed(b'"1,5"'), "(got '1,5'); write quantities as decimal numbers"),
        (
            CONSUMED.replace(b"+05:30", b"").replace(b"QTY", b"1"),
            "(got '2026-03-01T07:15:00.1234567'); timestamps need a UTC offset",
        ),
        (
            CONSUMED.replace(b"2026-03-01T07:15:00.1234567+05:30", b"today").replace(
                b"QTY", b"1"
            ),
            "(got 'today'); write timestamps in RFC 3339",
        ),
        (b"", "publish one JSON object per event"),
        (b"[" + consumed(b"1") + b"]", "publish arrays of events on plant.events"),
        (b'{"event_type":"shipment_confirmed"}', "`plantstream schema events`"),
        (b'{"event_type":"scrapped"}', "with the event types it accepts"),
        (b"{oops", "the body is not valid JSON"),
    ],
    ids=["decimal", "naive", "not_a_time", "empty", "array", "missing", "type", "json"],
)
def test_decode_error_names_value_and_fix(data: bytes, expected: str) -> None:
    with pytest.raises(msgspec.MsgspecError) as caught:
        decode_event(data)
    assert expected in describe_decode_error(caught.value, data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            CONSUMED.replace(b'"e1"', b'""').replace(b"QTY", b"1"),
            "(got ''); the value is empty, so fill it in;",
        ),
        (
            CONSUMED.replace(b'"e1"', b'"' + b"e" * 257 + b'"').replace(b"QTY", b"1"),
            "the value is too long, so shorten it to at most 256 characters;",
        ),
    ],
    ids=["empty", "too_long"],
)
def test_decode_error_length_hint(data: bytes, expected: str) -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        decode_event(data)
    detail = describe_decode_error(caught.value, data)
    assert "at `$.event_id`" in detail
    assert expected in detail
    assert detail.endswith("`plantstream schema events` prints the event contract")


@pytest.mark.parametrize(
    ("kind", "bound", "data", "expected"),
    [
        (str, msgspec.Meta(min_length=1), b'""', "the value is empty, so fill it in"),
        (
            str,
            msgspec.Meta(min_length=3),
            b'"ab"',
            "the value is empty or too short, so fill it in with at least 3 characters",
        ),
        (
            str,
            msgspec.Meta(max_length=1),
            b'"ab"',
            "the value is too long, so shorten it to at most 1 character",
        ),
        (
            list[int],
            msgspec.Meta(min_length=1),
            b"[]",
            "the array is empty, so fill it in",
        ),
        (
            list[int],
            msgspec.Meta(min_length=2),
            b"[1]",
            "the array is empty or too short, so fill it in with at least 2 elements",
        ),
        (
            list[int],
            msgspec.Meta(max_length=2),
            b"[1, 2, 3]",
            "the array is too long, so shorten it to at most 2 elements",
        ),
        (
            float,
            msgspec.Meta(ge=0),
            b"-1",
            "the value is too small, so send a number >= 0",
        ),
        (
            float,
            msgspec.Meta(le=9),
            b"10",
            "the value is too large, so send a number <= 9",
        ),
        (
            float,
            msgspec.Meta(gt=0.5),
            b"0.5",
            "the value is too small, so send a number > 0.5",
        ),
        (
            float,
            msgspec.Meta(lt=0.5),
            b"0.5",
            "the value is too large, so send a number < 0.5",
        ),
    ],
    ids=[
        "str_empty",
        "str_short",
        "str_long",
        "array_empty",
        "array_short",
        "array_long",
        "ge",
        "le",
        "gt",
        "lt",
    ],
)
def test_decode_error_bound_hint(
    kind: type, bound: msgspec.Meta, data: bytes, expected: str
) -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(data, type=Annotated[kind, bound])
    assert expected in describe_decode_error(caught.value, data)


def test_decode_error_names_invalid_utf8_byte() -> None:
    data = b'{"event_type": "\xff\xfe"}'
    with pytest.raises(msgspec.DecodeError) as caught:
        decode_event(data)
    detail = describe_decode_error(caught.value, data)
    assert detail.startswith("Invalid UTF-8 encoded string (byte 16), ")
    assert 'near ...b\'e": "\\xff\\xfe"}\'' in detail
    assert "the body is not UTF-8 encoded text" in detail
    assert detail.endswith("publish one UTF-8 encoded JSON object per event")


def test_decode_error_names_malformed_json_byte() -> None:
    data = b"hello world"
    with pytest.raises(msgspec.DecodeError) as caught:
        decode_event(data)
    detail = describe_decode_error(caught.value, data)
    assert "invalid character (byte 0)" in detail
    assert "near b'hello world'" in detail
    assert "the body is not valid JSON" in detail
    assert detail.endswith("publish one UTF-8 encoded JSON object per event")


@pytest.mark.parametrize(
    ("text", "escape"),
    [
        (rb"ab\ud800cd", r"\ud800"),  # msgspec calls this one truncated input
        (rb"ab\ud800", r"\ud800"),
        (rb"\udc00x", r"\udc00"),
        (rb"\ud800\u0041", r"\ud800"),
        (rb"a\\\ud800", r"\ud800"),  # an escaped backslash, then the escape
    ],
)
def test_decode_error_names_lone_surrogate(text: bytes, escape: str) -> None:
    data = consumed(b"1").replace(b'"source":"mes"', b'"source":"' + text + b'"')
    with pytest.raises(msgspec.DecodeError) as caught:
        decode_event(data)
    detail = describe_decode_error(caught.value, data)
    assert f"the escape {escape} at byte {data.index(escape.encode())}" in detail
    assert "truncated" not in detail


def test_decode_error_cuts_shown_bytes() -> None:
    data = b'{"a": 1} ' + b"x" * 100
    with pytest.raises(msgspec.DecodeError) as caught:
        msgspec.json.decode(data)
    detail = describe_decode_error(caught.value, data)
    assert "(byte 10), near ...b' 1} " + "x" * 21 + "'..." in detail


def test_edge_batch_element_array_hint() -> None:
    data = b"[" + consumed(b"1") + b"]"
    with pytest.raises(msgspec.ValidationError) as caught:
        decode_event(data)
    detail = describe_decode_error(caught.value, data, in_edge_batch=True)
    assert "each element of an edge batch must be one event object" in detail
    assert "plant.events.<plant>.batch" not in detail


def test_decode_error_cuts_a_long_value() -> None:
    data = consumed(b'"' + b"9" * 200 + b'x"')
    with pytest.raises(msgspec.ValidationError) as caught:
        decode_event(data)
    detail = describe_decode_error(caught.value, data)
    assert "(got '" + "9" * 59 + "...)" in detail
    assert len(detail) < 300


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("12.500", "12.500"),
        ("1e9999999", "1E+9999999"),
        ("1e-9999999", "1E-9999999"),
        ("5." + "0" * 40, "5.00000000000000000000000000000...E+0 (41 digits)"),
        ("-" + "9" * 35, "-9.99999999999999999999999999999...E+34 (35 digits)"),
    ],
)
def test_shown_decimal_stays_short(value: str, shown: str) -> None:
    assert shown_decimal(Decimal(value)) == shown


def test_shorten_letter_cuts_long_fields() -> None:
    letter = DeadLetter(
        reason="invalid",
        detail="x" * (MAX_DETAIL_CHARS + 500),
        subject="plant.events.P1.batch",
        stream_seq=7,
        data=b"{}",
        rejected_at=dt.datetime(2026, 1, 5, tzinfo=dt.UTC),
        event_id="E" * 1_000_000,
        plant="P1",
    )
    short = shorten_letter(letter)
    assert short.detail.endswith("... (540 characters cut)")
    assert len(short.detail) <= MAX_DETAIL_CHARS
    assert short.event_id is not None
    assert short.event_id.endswith("... (999,740 characters cut)")
    assert len(short.event_id) <= MAX_NAME_CHARS
    assert short.plant == "P1"
    assert shorten_letter(short) is short
    assert short.stream_seq == letter.stream_seq


DEEP = b"[" * 1000 + b"]" * 1000
"""An array nested past the depth msgspec decodes."""


@pytest.mark.parametrize(
    ("batch", "elements"),
    [
        (
            b'[{"a":' + DEEP + b'}, {"b":"x,]\\"}"}]',
            [b'{"a":' + DEEP + b"}", b'{"b":"x,]\\"}"}'],
        ),
        (b' [ {"a":' + DEEP + b"} ]\n", [b'{"a":' + DEEP + b"}"]),
    ],
)
def test_edge_batch_split_around_deep_element(
    batch: bytes, elements: list[bytes]
) -> None:
    assert [bytes(raw) for raw in decode_edge_batch(batch)] == elements


def test_edge_batch_split_around_lone_surrogate() -> None:
    # Only the element with the bad escape fails, when decoded on its own.
    batch = rb'[{"a":1}, {"b":"m\ud800"}, {"c":3}]'
    elements = [bytes(raw) for raw in decode_edge_batch(batch)]
    assert elements == [b'{"a":1}', rb'{"b":"m\ud800"}', b'{"c":3}']
    with pytest.raises(msgspec.DecodeError):
        decode_edge_batch(rb'[{"a":1}, {"b":"m\ud800"}')


@pytest.mark.parametrize(
    "batch",
    [
        b'[{"a":' + DEEP + b"}",
        b"[" + DEEP + b"]]",
        b'[{"a":' + DEEP + b', "b]',
        b"[" + DEEP + b",]",
        b"[" + DEEP + b",,1]",
    ],
)
def test_edge_batch_unbalanced_deep_rejected(batch: bytes) -> None:
    with pytest.raises(msgspec.DecodeError, match="nested too deeply") as caught:
        decode_edge_batch(batch)
    assert "not one JSON array either" in str(caught.value)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (b'{"material":"R\\u0000M"}', "material"),
        (b'{"a.b":{"c":"\\u0000"}}', "['a.b'].c"),
        (b'{"a":{"b.c":"\\u0000"}}', "a['b.c']"),
        (b'{"lots":[["x","\\u0000"]]}', "lots[0][1]"),
        (b'{"a\\u0000":1}', "['a\\x00']"),
    ],
)
def test_nul_character_named(event: bytes, field: str) -> None:
    with pytest.raises(ValueError, match="contains a NUL character") as caught:
        check_no_nul(event)
    assert f"field {field!r} " in str(caught.value)


def test_nul_check_passes_escaped_backslash() -> None:
    check_no_nul(b'{"source":"C:\\\\u0000"}')


def test_nul_check_too_deep_rejected() -> None:
    event = b'{"material":"R\\u0000M","z":' + DEEP + b"}"
    with pytest.raises(msgspec.DecodeError, match="nested too deeply"):
        check_no_nul(event)

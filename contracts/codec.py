"""Reusable msgspec encoders and decoders for each stream's contract."""

from __future__ import annotations

import re
from decimal import Decimal

import msgspec

from contracts.dead_letters import DeadLetter
from contracts.events import PlantEvent
from contracts.keys import nesting_error
from contracts.postings import GoodsMovement, Posting

__all__ = [
    "decode_dead_letter",
    "decode_edge_batch",
    "decode_event",
    "decode_posting",
    "describe_decode_error",
    "encode",
    "encode_posting",
    "lone_surrogate_detail",
]

_event_decoder = msgspec.json.Decoder(PlantEvent)
_posting_decoder = msgspec.json.Decoder(Posting)
_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
_edge_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder(decimal_format="string")


def decode_event(data: bytes) -> PlantEvent:
    """Decode and validate one event; raise msgspec.ValidationError or DecodeError."""
    try:
        return _event_decoder.decode(data)
    except RecursionError:
        raise nesting_error() from None


def decode_edge_batch(data: bytes) -> list[msgspec.Raw]:
    """Split an edge batch into the raw JSON of its events; raise msgspec.DecodeError
    or ValidationError if it is not a JSON array."""
    try:
        return _edge_batch_decoder.decode(data)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError:
        # msgspec checks the escapes of every string while it splits, so one element
        # with a lone surrogate would fail the batch. Split by hand, so that only that
        # element fails, when decoded.
        elements = _split_array(data) if _lone_surrogate(data) is not None else None
        if elements is None:
            raise
        return [msgspec.Raw(element) for element in elements]
    except RecursionError:
        # msgspec walks into every element to find where it ends. Split by hand
        # instead, so that only the element nested too deeply fails, when decoded.
        elements = _split_array(data)
        if elements is None:
            raise msgspec.DecodeError(
                f"{nesting_error()}. The batch is not one JSON array either: its "
                "brackets or quotes do not close, or an element is missing between "
                "commas"
            ) from None
        return [msgspec.Raw(element) for element in elements]


_QUOTE, _BACKSLASH, _COMMA = ord('"'), ord("\\"), ord(",")
_OPENING, _CLOSING = frozenset(b"[{"), frozenset(b"]}")


def _split_array(data: bytes) -> list[bytes] | None:
    """Return the bytes of each element of the JSON array `data`, undecoded, or None
    if its brackets and quotes do not make one array.

    It loops over every byte in Python, so it runs only for batches msgspec cannot
    split.
    """
    text = data.strip(b" \t\r\n")
    if len(text) < 2 or text[0] != ord("[") or text[-1] != ord("]"):
        return None
    elements: list[bytes] = []
    depth, start = 0, 1
    in_string = escaped = False
    for index in range(1, len(text) - 1):
        byte = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPENING:
            depth += 1
        elif byte in _CLOSING:
            depth -= 1
            if depth < 0:
                return None
        elif byte == _COMMA and depth == 0:
            elements.append(text[start:index].strip(b" \t\r\n"))
            start = index + 1
    if in_string or depth:
        return None
    last = text[start:-1].strip(b" \t\r\n")
    if last or elements:
        elements.append(last)
    # Like msgspec, reject "[1,]" and "[1,,2]". An element that is not one JSON value
    # ("1 2") is left for its own decode to reject.
    return None if b"" in elements else elements


def decode_posting(data: bytes) -> Posting:
    return _posting_decoder.decode(data)


def decode_dead_letter(data: bytes) -> DeadLetter:
    return _dead_letter_decoder.decode(data)


def encode(value: object) -> bytes:
    """Encode any contract Struct as JSON, with Decimals as exact strings."""
    return _encoder.encode(value)


class _PlainDecimal(Decimal):
    """A Decimal that `encode_posting` writes in plain notation.

    msgspec writes a Decimal as str() does, which uses an exponent below 0.000001 and
    for a value such as Decimal("1E+3"), and keeps the trailing zeros that arithmetic
    leaves ("162.000000000"). An ERP field parser may reject the first and pad or cut
    the second. msgspec hands a subclass of Decimal to the encoder's hook instead.
    """

    __slots__ = ()


def _encode_plain(value: object) -> str:
    if isinstance(value, _PlainDecimal):
        return format(value, "f")
    raise NotImplementedError(f"cannot encode {type(value).__name__} in a posting")


_posting_encoder = msgspec.json.Encoder(enc_hook=_encode_plain, decimal_format="string")


def _plain(value: Decimal) -> Decimal | None:
    """Return `value` to write in plain notation, or None when str() writes it so."""
    # str() writes an exponent ("E") above exponent 0 and below 0.000001, keeps a
    # trailing zero after the point and the sign of a negative zero. Reading that text
    # is four times faster than as_tuple().
    text = str(value)
    if "E" in text or ("." in text and text[-1] == "0") or text == "-0":
        normal = value.normalize()
        # normalize() keeps the sign of a negative zero; a posted quantity has none.
        return _PlainDecimal(normal if normal else 0)
    return None


def encode_posting(posting: Posting) -> bytes:
    """Encode a posting, with each quantity an exact decimal in plain notation."""
    if isinstance(posting, GoodsMovement):
        quantity = _plain(posting.quantity)
        if quantity is not None:
            posting = msgspec.structs.replace(posting, quantity=quantity)
    else:
        changes = {
            name: plain
            for name in ("yield_quantity", "scrap_quantity", "rework_quantity")
            if (plain := _plain(getattr(posting, name))) is not None
        }
        if changes:
            posting = msgspec.structs.replace(posting, **changes)
    return _posting_encoder.encode(posting)


_SCHEMA_HINT = "`plantstream schema events` prints the event contract"
_ARRAY_GIVEN = "Expected `object`, got `array`"

# msgspec's message, matched at its start, and what the publisher should change.
_HINTS = (
    (
        "Expected `datetime` with a timezone component",
        "timestamps need a UTC offset, such as 2026-01-05T06:00:00+01:00 or "
        "2026-01-05T05:00:00Z",
    ),
    (
        "Invalid RFC3339 encoded datetime",
        "write timestamps in RFC 3339, such as 2026-01-05T06:00:00+01:00",
    ),
    (
        "Invalid decimal string",
        'write quantities as decimal numbers such as "12.500" or 12.5, with "." '
        "as the decimal point and no thousands separator",
    ),
    (
        "Input data was truncated",
        "the body is empty or cut short; publish one JSON object per event",
    ),
    (
        _ARRAY_GIVEN,
        "an event is one JSON object; publish arrays of events on "
        "plant.events.<plant>.batch",
    ),
    ("Object missing required field", _SCHEMA_HINT),
    ("Invalid value", f"{_SCHEMA_HINT}, with the event types it accepts"),
    ("Expected", _SCHEMA_HINT),
)
_PATH = re.compile(r" - at `\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)`$")
_PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
_SHOWN_VALUE_CHARS = 60

# msgspec's message for a failed min/max constraint (msgspec.Meta min_length,
# max_length, ge, gt, le, lt), such as "Expected `str` of length >= 1" or
# "Expected `int` <= 10". msgspec 0.23 reports gt and lt on integers as >= and <=.
_BOUND = re.compile(
    r"^Expected `(?P<type>\w+)` (?P<length>of length )?(?P<op>>=|>|<=|<) "
    r"(?P<limit>[^ ]+)"
)
# The noun for the value and the plural unit of its length, by msgspec's type name.
_BOUND_UNITS = {
    "str": ("value", "characters"),
    "bytes": ("value", "bytes"),
    "array": ("array", "elements"),
    "object": ("object", "fields"),
}

_MALFORMED_JSON = "JSON is malformed"
_BYTE_OFFSET = re.compile(r" \(byte (\d+)\)$")
_INVALID_UTF8 = "Invalid UTF-8 encoded string"
_WIRE_FORMAT_HINT = "publish one UTF-8 encoded JSON object per event"
# Bytes of the body shown before and from the failing offset.
_BYTES_BEFORE = 5
_BYTES_FROM = 20


def describe_decode_error(
    error: msgspec.MsgspecError, data: bytes, *, in_edge_batch: bool = False
) -> str:
    """Return msgspec's message with the offending value and what to change.

    msgspec names the place (`$.quantity.value`) but not the value or the fix, and the
    dead letter's reader needs all three. Set `in_edge_batch` for one element of an
    edge batch, which is already on the batch subject.
    """
    message = str(error)
    match = _PATH.search(message)
    if match is not None and match.group(1):
        found, value = _value_at(data, match.group(1))
        if found:
            value_text = repr(value)
            if len(value_text) > _SHOWN_VALUE_CHARS:
                value_text = value_text[:_SHOWN_VALUE_CHARS] + "..."
            if value_text not in message:
                message = f"{message} (got {value_text})"
    if message.startswith(("Input data was truncated", _MALFORMED_JSON)):
        # msgspec reports a high surrogate without its low half as truncated input,
        # which points the publisher at the wrong problem.
        surrogate = lone_surrogate_detail(data)
        if surrogate is not None:
            return surrogate
    malformed = _describe_malformed(message, data)
    if malformed is not None:
        return malformed
    bound_hint = _bound_hint(message)
    if bound_hint is not None:
        return f"{message}; {bound_hint}; {_SCHEMA_HINT}"
    for start, hint in _HINTS:
        if message.startswith(start):
            if in_edge_batch and start == _ARRAY_GIVEN:
                hint = "each element of an edge batch must be one event object"
            return f"{message}; {hint}"
    return message


_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)
"""One JSON escape sequence; group 1 is the code unit of a \\u escape."""


def lone_surrogate_detail(data: bytes) -> str | None:
    """Return a dead letter's detail for the first lone UTF-16 surrogate escape in
    `data`, or None if it has none."""
    surrogate = _lone_surrogate(data)
    if surrogate is None:
        return None
    offset, escape = surrogate
    return (
        f"JSON is malformed: the escape {escape} at byte {offset} is half of a UTF-16 "
        "surrogate pair without its other half; send the character as UTF-8, or "
        "escape it as a whole pair such as \\ud83d\\ude00"
    )


def _lone_surrogate(data: bytes) -> tuple[int, str] | None:
    """Return the offset and text of the first \\u escape that is half of a UTF-16
    surrogate pair without the other half, or None."""
    high: re.Match[bytes] | None = None
    for escape in _ESCAPE.finditer(data):
        unit = int(escape.group(1), 16) if escape.group(1) else -1
        is_low = 0xDC00 <= unit <= 0xDFFF
        if high is not None and not (is_low and escape.start() == high.end()):
            return high.start(), high.group().decode()
        if is_low and high is None:
            return escape.start(), escape.group().decode()
        high = escape if 0xD800 <= unit <= 0xDBFF else None
    if high is not None:
        return high.start(), high.group().decode()
    return None


def _describe_malformed(message: str, data: bytes) -> str | None:
    """Return the detail for a body that is not UTF-8 encoded JSON, else None.

    The detail adds the bytes at the failing offset and the fix to msgspec's message.
    msgspec names the offset of malformed JSON but not of invalid UTF-8, so that offset
    comes from Python's UTF-8 decoder.
    """
    offset: int | None = None
    problem = "the body is not valid JSON"
    if message.startswith(_MALFORMED_JSON):
        offset_match = _BYTE_OFFSET.search(message)
        if offset_match is not None:
            offset = int(offset_match.group(1))
    elif message.startswith(_INVALID_UTF8):
        problem = "the body is not UTF-8 encoded text"
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as error:
            offset = error.start
            message = f"{message} (byte {offset})"
    else:
        return None
    if offset is not None and offset < len(data):
        # The excerpt starts a few bytes early because msgspec 0.23 reports some
        # offsets one byte past the bad one ("trailing characters", "invalid
        # character in unicode escape").
        start = max(offset - _BYTES_BEFORE, 0)
        end = offset + _BYTES_FROM
        excerpt = repr(data[start:end])
        if start > 0:
            excerpt = f"...{excerpt}"
        if end < len(data):
            excerpt = f"{excerpt}..."
        message = f"{message}, near {excerpt}"
    return f"{message}; {problem}, so {_WIRE_FORMAT_HINT}"


def _bound_hint(message: str) -> str | None:
    """Return what to change for a value outside a min/max constraint, or None."""
    match = _BOUND.match(message)
    if match is None:
        return None
    kind, op, limit = match.group("type"), match.group("op"), match.group("limit")
    too_high = op in ("<=", "<")
    if match.group("length") is None:
        size = "large" if too_high else "small"
        return f"the value is too {size}, so send a number {op} {limit}"
    noun, unit = _BOUND_UNITS.get(kind, (kind, "entries"))
    count = f"{limit} {unit.removesuffix('s') if limit == '1' else unit}"
    if too_high:
        return f"the {noun} is too long, so shorten it to at most {count}"
    if limit == "1":
        return f"the {noun} is empty, so fill it in"
    return f"the {noun} is empty or too short, so fill it in with at least {count}"


def _value_at(data: bytes, path: str) -> tuple[bool, object]:
    try:
        value: object = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        # The typed decode can fail at a shallow field before it meets the deep
        # nesting elsewhere in the message, which this untyped one must walk.
        return False, None
    for name, index in _PATH_STEP.findall(path):
        if name and isinstance(value, dict) and name in value:
            value = value[name]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            return False, None
    return True, value

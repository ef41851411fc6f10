"""Reading settings dataclasses from PLANTSTREAM_* environment variables."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

_S = TypeVar("_S")

__all__ = ["fields_from_env", "settings_from_env"]


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


# Settings fields are annotated as strings (postponed annotations), so map the names.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": _parse_bool,
}


def fields_from_env(cls: type, environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the fields of dataclass `cls` that `environ` sets, converted to their
    types.

    A field `fetch_batch` is read from PLANTSTREAM_FETCH_BATCH.
    """
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name = f"PLANTSTREAM_{field.name.upper()}"
        if name not in environ:
            continue
        type_name = field.type if isinstance(field.type, str) else field.type.__name__
        parse = _PARSERS[type_name]
        try:
            values[field.name] = parse(environ[name])
        except ValueError as error:
            raise ValueError(
                f"environment variable {name}={environ[name]!r} is not a valid "
                f"{type_name}: {error}"
            ) from error
    return values


def settings_from_env(cls: type[_S], environ: Mapping[str, str]) -> _S:
    """Build dataclass `cls` from the defaults and the PLANTSTREAM_* variables it reads.

    A value the dataclass rejects raises ValueError naming the variable that set it,
    so the user can tell which one to change.
    """
    values = fields_from_env(cls, environ)
    try:
        return cls(**values)
    except ValueError as error:
        # The dataclass's own checks name the field, not the variable.
        for field in values:
            if field in str(error):
                name = f"PLANTSTREAM_{field.upper()}"
                raise ValueError(
                    f"environment variable {name}={environ[name]!r} is invalid: "
                    f"{error}; change or unset it"
                ) from error
        raise

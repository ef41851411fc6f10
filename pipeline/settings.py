"""Settings of the NATS side: streams, the ingest consumer and batching."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.subjects import validate_token

__all__ = ["PipelineSettings", "validate_number_variables"]

_CONSUMER_NAME = re.compile(r"[A-Za-z0-9_-]+")
_MAX_COUNT = 1_000_000_000
"""Upper bound of fetch_batch and max_unacked: far beyond what one run keeps in memory,
and low enough that the consumer's max_ack_pending, twice max_unacked, is a number the
server takes."""
_MIN_SECONDS = 0.001
_MAX_SECONDS = 100 * 365 * 24 * 3600.0


_NUMBER_PARSERS = {"int": int, "float": float}


def validate_number_variables(cls: type, environ: Mapping[str, str]) -> None:
    """Raise ValueError for a PLANTSTREAM_* variable of a numeric field of dataclass
    `cls` that is not a number, naming the variable, its value and the expected form.
    """
    for field in dataclasses.fields(cls):
        name = f"PLANTSTREAM_{field.name.upper()}"
        raw = environ.get(name)
        type_name = field.type if isinstance(field.type, str) else field.type.__name__
        parse = _NUMBER_PARSERS.get(type_name)
        if raw is None or parse is None:
            continue
        try:
            parse(raw)
        except ValueError:
            form = "a whole number" if type_name == "int" else "a number"
            if field.name.endswith("_s"):
                form += " of seconds"
            raise ValueError(
                f"environment variable {name}={raw!r} is not {form}; set it to "
                f"{form}, e.g. {field.default!r} (the default), or unset it"
            ) from None


@dataclass(frozen=True)
class PipelineSettings:
    """Stream and consumer settings; each has the environment variable that overrides
    it.

    Times are in seconds.
    """

    consumer: str = "plantstream-ingest"
    """Durable name of the pull consumer on PLANT_EVENTS (PLANTSTREAM_CONSUMER)."""

    fetch_batch: int = 2000
    """Messages per fetch (PLANTSTREAM_FETCH_BATCH); larger ones amortise Ray calls."""

    fetch_timeout_s: float = 0.5
    """How long one fetch waits for messages (PLANTSTREAM_FETCH_TIMEOUT_S)."""

    checkpoint_interval_s: float = 2.0
    """Time between checkpoints (PLANTSTREAM_CHECKPOINT_INTERVAL_S). Source messages are
    acknowledged only at a checkpoint, so this bounds how much a crash makes us
    replay."""

    max_unacked: int = 100_000
    """Messages processed but not yet covered by a checkpoint before one is forced
    (PLANTSTREAM_MAX_UNACKED). The consumer's max_ack_pending is set above it."""

    ack_wait_s: float = 120.0
    """JetStream redelivers a message not acknowledged within this time
    (PLANTSTREAM_ACK_WAIT_S).
    It must exceed the checkpoint interval plus the slowest checkpoint, or messages
    would be redelivered while still in flight."""

    postings_duplicate_window_s: float = 24 * 3600.0
    """How long the postings stream remembers a posting key to drop a republished
    posting
    (PLANTSTREAM_POSTINGS_DUPLICATE_WINDOW_S). Consumers must still use the key beyond
    it."""

    events_duplicate_window_s: float = 120.0
    """Duplicate window of the plant events stream for publishers that set Nats-Msg-Id
    (PLANTSTREAM_EVENTS_DUPLICATE_WINDOW_S). Deduplication by event id in the actors
    does not depend on it."""

    events_max_age_s: float = 30 * 24 * 3600.0
    """How long plant events stay in their stream, which bounds how far back replay can
    go
    (PLANTSTREAM_EVENTS_MAX_AGE_S)."""

    sites: str = ""
    """Comma-separated plant ids that run as leaf-node sites (PLANTSTREAM_SITES).
    PLANT_EVENTS
    sources each one's buffer stream SITE_<plant> from JetStream domain site-<plant>."""

    def __post_init__(self) -> None:
        for plant in self.site_plants():
            try:
                validate_token(plant, "plant")
            except ValueError:
                raise ValueError(
                    f"sites contains the plant id {plant!r}, which cannot be a NATS "
                    "subject token; use letters, digits, '_' and '-' in plant ids and "
                    "separate them with commas, e.g. P01,P02"
                ) from None
        if not _CONSUMER_NAME.fullmatch(self.consumer):
            raise ValueError(
                f"consumer {self.consumer!r} is not a JetStream consumer name; use "
                "letters, digits, '_' and '-' only"
            )
        for name in ("fetch_batch", "max_unacked"):
            value = getattr(self, name)
            if not 1 <= value <= _MAX_COUNT:
                raise ValueError(
                    f"{name} must be between 1 and {_MAX_COUNT:,}, got {value}"
                )
        for name in (
            "fetch_timeout_s",
            "checkpoint_interval_s",
            "ack_wait_s",
            "postings_duplicate_window_s",
            "events_duplicate_window_s",
            "events_max_age_s",
        ):
            value = getattr(self, name)
            # JetStream takes durations in whole nanoseconds as 64-bit integers, and
            # turns a duplicate window of 0 into its default instead of rejecting it.
            if not (math.isfinite(value) and _MIN_SECONDS <= value <= _MAX_SECONDS):
                raise ValueError(
                    f"{name} must be a number of seconds between {_MIN_SECONDS:g} "
                    f"and {_MAX_SECONDS:g} (100 years), got {value}"
                )

        if self.events_duplicate_window_s > self.events_max_age_s:
            # JetStream rejects a stream whose duplicate window outlasts its messages.
            raise ValueError(
                "events_duplicate_window_s "
                f"({self.events_duplicate_window_s:g} s) must not exceed "
                f"events_max_age_s ({self.events_max_age_s:g} s); shorten the window "
                "or keep the events longer"
            )

    def site_plants(self) -> list[str]:
        return [plant.strip() for plant in self.sites.split(",") if plant.strip()]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PipelineSettings:
        """Build settings from PLANTSTREAM_* environment variables over the defaults."""
        import os

        from cluster.env import settings_from_env

        variables: Mapping[str, str] = os.environ if environ is None else environ
        validate_number_variables(cls, variables)
        return settings_from_env(cls, variables)

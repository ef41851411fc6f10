"""Settings of the partition actors' state."""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["StateSettings", "parse_plant_timezones"]


def parse_plant_timezones(raw: str) -> dict[str, str]:
    """Parse "P01=Europe/Berlin,P02=America/Chicago" into a dict of IANA zone names.

    Raises ValueError naming the entry that has no "=" or names an unknown zone.
    """
    zones: dict[str, str] = {}
    for entry in raw.split(","):
        entry = entry.strip()
        if not entry:
            continue
        plant, sep, zone = entry.partition("=")
        plant, zone = plant.strip(), zone.strip()
        if not sep or not plant or not zone:
            raise ValueError(
                f"plant_timezones entry {entry!r} is not PLANT=Area/City; write it "
                "as e.g. P01=Europe/Berlin"
            )
        try:
            zoneinfo.ZoneInfo(zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"plant_timezones entry {entry!r}: {zone!r} is not an IANA time "
                "zone name; use a name such as Europe/Berlin or America/Chicago"
            ) from None
        zones[plant] = zone
    return zones


@dataclass(frozen=True)
class StateSettings:
    """Per-partition state limits, each with the environment variable that sets it."""

    dedup_max_ids: int = 2_000_000
    """Event ids each partition remembers for deduplication (PLANTSTREAM_DEDUP_MAX_IDS).
    The oldest ids are forgotten first. An order keeps the ids of the events applied to
    it, so a duplicate of an order event is still recognised after that, and one for an
    evicted order becomes an `order_closed` dead letter (closed_order_retention_s). Any
    other duplicate of a forgotten id is applied again. Each id costs about 25 bytes."""

    closed_order_retention_s: float = 7 * 24 * 3600.0
    """How long a completed order stays in memory after its last event
    (PLANTSTREAM_CLOSED_ORDER_RETENTION_S). Event-time seconds behind its plant's
    watermark, so a replay evicts the same orders. An order with blocked stock or an
    active hold is kept. An evicted order stays in DuckDB, and a later event for it
    becomes an `order_closed` dead letter."""

    eviction_interval_seqs: int = 10_000
    """Stream sequences between two scans for completed orders to evict
    (PLANTSTREAM_EVICTION_INTERVAL_SEQS). A scan runs before the first message whose
    stream sequence enters the next multiple of this. Stream positions rather than
    wall-clock time decide it, so a state restored after a crash scans before the same
    messages as the process that died, and evicts the same orders."""

    closed_order_max_keys: int = 1_000_000
    """Evicted orders each partition remembers per plant, to dead-letter their later
    events (PLANTSTREAM_CLOSED_ORDER_MAX_KEYS). The oldest are forgotten first, and a
    later event for a forgotten order parks as if its release were missing. Each costs
    about 25 bytes."""

    park_timeout_s: float = 24 * 3600.0
    """How long an event waits for its prerequisite, such as its order's release,
    before it becomes a dead letter (PLANTSTREAM_PARK_TIMEOUT_S). Wall-clock seconds,
    checked every few seconds while batches arrive."""

    max_future_s: float = 300.0
    """How far an event's occurred_at may lie ahead of this host's clock before it is
    rejected as a fast plant clock (PLANTSTREAM_MAX_FUTURE_S)."""

    lateness_tolerance_s: float = 300.0
    """How far behind its plant's watermark an event may arrive before it counts as
    late in `plant_clocks` (PLANTSTREAM_LATENESS_TOLERANCE_S). Late events are still
    applied."""

    machine_history: int = 256
    """Closed state intervals each machine keeps, so that a state change arriving late
    is inserted into its history (PLANTSTREAM_MACHINE_HISTORY). A state change older
    than the oldest kept interval is dead-lettered."""

    plant_timezones: str = ""
    """IANA time zone per plant for the plant-local day and shift views, as
    "P01=Europe/Berlin,P02=America/Chicago" (PLANTSTREAM_PLANT_TIMEZONES). A plant
    without one is bucketed by the UTC offset its events carry."""

    shift_start: str = "06:00"
    """Plant-local start of the first shift of a day, HH:MM (PLANTSTREAM_SHIFT_START). A
    shift belongs to the day on which it starts."""

    shift_hours: int = 8
    """Length of a shift in hours; it must divide 24 (PLANTSTREAM_SHIFT_HOURS)."""

    def __post_init__(self) -> None:
        parse_plant_timezones(self.plant_timezones)
        self.shift_start_min()
        if self.shift_hours < 1 or 24 % self.shift_hours:
            raise ValueError(
                f"shift_hours must divide 24 (1, 2, 3, 4, 6, 8, 12 or 24), got "
                f"{self.shift_hours}"
            )
        for name in (
            "dedup_max_ids",
            "closed_order_max_keys",
            "eviction_interval_seqs",
        ):
            value = getattr(self, name)
            if not 1 <= value < 2**32 - 1:
                raise ValueError(
                    f"{name} must be between 1 and {2**32 - 2}, got {value}"
                )
        for name in (
            "closed_order_retention_s",
            "park_timeout_s",
            "max_future_s",
            "lateness_tolerance_s",
        ):
            # The state turns these into timedeltas and integers, which an infinite
            # value breaks only inside the partition actors, where a start retries.
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{name} must be a finite number of seconds, 0 or more, got {value}"
                )
        if self.machine_history < 1:
            raise ValueError(
                f"machine_history must be at least 1, got {self.machine_history}"
            )

    def shift_start_min(self) -> int:
        """Return the first shift's start in minutes after local midnight."""
        try:
            start = dt.time.fromisoformat(self.shift_start)
        except ValueError:
            raise ValueError(
                f"shift_start {self.shift_start!r} is not a time of day; write it as "
                "HH:MM, e.g. 06:00"
            ) from None
        return start.hour * 60 + start.minute

    def time_zones(self) -> dict[str, str]:
        """Return the configured IANA time zone per plant."""
        return parse_plant_timezones(self.plant_timezones)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> StateSettings:
        """Build settings from PLANTSTREAM_* environment variables over the defaults."""
        import os

        from cluster.env import settings_from_env
        from pipeline.settings import validate_number_variables

        variables: Mapping[str, str] = os.environ if environ is None else environ
        validate_number_variables(cls, variables)
        return settings_from_env(cls, variables)

"""Settings of the partition actors' state."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StateSettings"]


@dataclass(frozen=True)
class StateSettings:
    """Limits of the per-partition state; each has the environment variable that sets it."""

    dedup_max_ids: int = 2_000_000
    """Event ids each partition remembers for deduplication (PLANTSTREAM_DEDUP_MAX_IDS).
    The oldest ids are forgotten first; a duplicate older than that is applied again."""

    park_timeout_s: float = 24 * 3600.0
    """How long an event waits for its prerequisite, such as its order's release, before it
    becomes a dead letter (PLANTSTREAM_PARK_TIMEOUT_S). Measured on the wall clock."""

    max_future_s: float = 300.0
    """How far an event's occurred_at may lie ahead of this host's clock before it is
    rejected as a fast plant clock (PLANTSTREAM_MAX_FUTURE_S)."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> StateSettings:
        import os

        from cluster.env import fields_from_env

        return cls(**fields_from_env(cls, os.environ if environ is None else environ))

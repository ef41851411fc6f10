"""Logging of a NATS client's lost connections, rate-limited for long outages.

nats-py calls the error callback once per failed reconnect attempt, every
`reconnect_time_wait` seconds, for as long as the server is away. `ConnectionLog` turns
that into one WARNING when the connection is lost, at most one WARNING summary per
`summary_interval_s` while it stays lost, and one INFO line when it is back. Each
failed attempt is still logged at DEBUG.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client

logger = logging.getLogger(__name__)

__all__ = ["SUMMARY_INTERVAL_S", "ConnectionLog", "redact_url"]

SUMMARY_INTERVAL_S = 30.0
"""Minimum seconds between two WARNING lines of one outage."""

CONNECTION_LOST_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
)
"""Errors with which nats-py reports a lost connection, right before it reconnects."""


def redact_url(url: str) -> str:
    """Return `url` without its user name, password or token, so it can be logged."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class ConnectionLog:
    """The error, disconnected and reconnected callbacks for one nats-py client.

    Pass `error`, `disconnected` and `reconnected` to `Client.connect` as `error_cb`,
    `disconnected_cb` and `reconnected_cb`, and call `connected` once `connect`
    returns. An outage starts at the first failed attempt of the first connection, or
    when an established connection is lost, and ends when the client is connected.
    """

    def __init__(
        self,
        client: Client,
        url: str,
        *,
        summary_interval_s: float = SUMMARY_INTERVAL_S,
    ) -> None:
        self._client = client
        self._url = redact_url(url)
        self._summary_interval_s = summary_interval_s
        self._outage_started: float | None = None
        self._last_warning = 0.0
        self._failed_attempts = 0
        self._cause: Exception | None = None
        """The error that ended the connection, kept for the WARNING of the loss."""
        self._first_connected = False
        """False until `connected`: every error before it is a failed first attempt."""

    async def error(self, error: Exception) -> None:
        client = self._client
        if client.is_closed:
            logger.debug(
                "NATS client for %s closed with %s", self._url, _describe(error)
            )
            return
        if not self._first_connected or client.is_connecting or client.is_reconnecting:
            self._attempt_failed(error)
            return
        if isinstance(error, CONNECTION_LOST_ERRORS):
            # nats-py reconnects right after this error, and the loss is logged then.
            self._cause = error
            logger.debug(
                "NATS connection to %s failed: %s", self._url, _describe(error)
            )
            return
        logger.warning("NATS connection to %s: %s", self._url, _describe(error))

    async def disconnected(self) -> None:
        # nats-py calls this on close() too, which is no outage, so only a client that
        # is reconnecting starts one.
        if self._client.is_reconnecting and self._outage_started is None:
            self._start_outage()

    async def reconnected(self) -> None:
        self._end_outage("reconnected to")

    def connected(self) -> None:
        """Log the end of the outage that delayed the first connection, if any."""
        self._first_connected = True
        self._end_outage("connected to")

    def _start_outage(self) -> float:
        now = time.monotonic()
        self._outage_started = now
        self._last_warning = now
        self._failed_attempts = 0
        cause = "" if self._cause is None else f" ({_describe(self._cause)})"
        action = "lost connection to" if self._first_connected else "cannot connect to"
        logger.warning(
            "%s NATS at %s%s; retrying, with a summary every %g s until connected",
            action,
            self._url,
            cause,
            self._summary_interval_s,
        )
        return now

    def _attempt_failed(self, error: Exception) -> None:
        started = self._outage_started
        if started is None:
            self._cause = self._cause or error
            started = self._start_outage()
        self._failed_attempts += 1
        now = time.monotonic()
        if now - self._last_warning < self._summary_interval_s:
            logger.debug(
                "attempt %d to connect to NATS at %s failed: %s",
                self._failed_attempts,
                self._url,
                _describe(error),
            )
            return
        self._last_warning = now
        logger.warning(
            "still disconnected from NATS at %s after %d failed attempts, %.0f s; "
            "last error: %s",
            self._url,
            self._failed_attempts,
            now - started,
            _describe(error),
        )

    def _end_outage(self, action: str) -> None:
        if self._outage_started is None:
            return
        logger.info(
            "%s NATS at %s after %d failed attempts, %.1f s",
            action,
            self._url,
            self._failed_attempts,
            time.monotonic() - self._outage_started,
        )
        self._outage_started = None
        self._failed_attempts = 0
        self._cause = None

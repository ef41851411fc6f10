"""SIGTERM handled as SIGINT, for the benchmark commands that start servers and Ray.

`timeout` and CI runners stop a command with SIGTERM. Its default action ends the
process at once, and Ray's handler (set by `ray.init`) calls `sys.exit` wherever the
main thread is, so neither runs the `async with` and `finally` blocks that stop the
nats-server and remove the temporary folders. With `SigtermAsInterrupt` installed,
SIGTERM takes the path of Ctrl-C instead.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

logger = logging.getLogger(__name__)

__all__ = ["SigtermAsInterrupt"]


class SigtermAsInterrupt:
    """A SIGTERM handler that calls the current SIGINT handler.

    Inside `asyncio.run` the SIGINT handler is asyncio's: the first signal cancels the
    main task, so the clean-up runs at its next `await`, and a second one raises
    KeyboardInterrupt at once. Elsewhere it is Python's default, which raises
    KeyboardInterrupt. The caller catches KeyboardInterrupt and exits with
    `exit_code`.
    """

    def __init__(self) -> None:
        self.signal: signal.Signals = signal.SIGINT
        """The signal that stopped the command: SIGTERM once one came, else SIGINT."""

    def install(self) -> None:
        """Set the SIGTERM handler (again after `ray.init`, which sets its own)."""
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum)
        logger.info("received %s; stopping as on Ctrl-C", self.signal.name)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
            return
        # SIGINT is ignored, as in a background job of a non-interactive shell, so
        # asyncio installed no handler of its own.
        raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 130 for SIGINT, 143
        for SIGTERM."""
        return 128 + self.signal.value

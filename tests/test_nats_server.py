"""The embedded nats-server stops with the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

EXIT_TIMEOUT_S = 10.0
"""How long nats-server may take to exit on SIGTERM."""

_STARTER = """
import sys
import time
from pathlib import Path
from cluster.nats_server import EmbeddedNatsServer
server = EmbeddedNatsServer(Path(sys.argv[1])).start()
print(server.pid, flush=True)
time.sleep(120)
"""
"""Starts a server whose store is the folder in argv[1]: the killed parent cannot
remove a store of its own, which would stay behind in the system's temporary folder."""


def process_gone(pid: int) -> bool:
    """Return True once `pid` has exited; a zombie that no one reaped counts."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The state follows the command name, which is in brackets.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_server_exits_with_killed_parent(tmp_path: Path) -> None:
    # SIGKILL runs no clean-up in the parent, so only the kernel can stop the server.
    parent = subprocess.Popen(
        [sys.executable, "-c", _STARTER, str(tmp_path / "store")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    server_pid = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while not process_gone(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(server_pid), f"nats-server {server_pid} still runs"
    finally:
        if not process_gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)

"""The machine and the software versions a benchmark ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cluster.nats_server import find_nats_server

__all__ = ["machine_info", "software_versions", "source_commit"]

PACKAGES = ("ray", "nats-py", "msgspec", "pyarrow", "duckdb", "bytewax")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def source_commit() -> str:
    """Return the git commit of this checkout, marked when files differ from it.

    BENCHMARKS.md itself and the ignored output folder do not count, because a run
    rewrites them.
    """
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--", ".", ":!BENCHMARKS.md")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{commit} with uncommitted changes" if changed else commit


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                name = line.split("=", 1)[1].strip('"')
                return f"{name}, Linux {platform.release()}"
    except OSError:
        pass
    return platform.platform()


def machine_info() -> dict[str, str]:
    memory = _memory_bytes()
    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "RAM": "unknown" if memory is None else f"{memory / 2**30:.1f} GiB",
        "OS": _os_name(),
    }


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    try:
        output = subprocess.run(
            [find_nats_server(), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        versions["nats-server"] = output.strip().removeprefix("nats-server: ")
    except (OSError, subprocess.SubprocessError) as error:
        versions["nats-server"] = f"unknown ({error})"
    return versions

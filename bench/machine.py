"""What the benchmark ran on, and the versions of everything it compared.

Each figure is looked up the way its owner reports it; one that cannot
be found says so instead of stopping the run.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import servers


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _output(argv: list[str], env: dict[str, str] | None = None, *, any_status: bool = False) -> str:
    """Standard output and error of a short command, stripped; "" if it cannot run or fails.

    ``any_status``: keep what it said even when it exits non-zero
    (systemd-detect-virt says "none" with status 1).
    """
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if done.returncode and not any_status:
        return ""
    return (done.stdout + done.stderr).strip()


def _cpu_model() -> str:
    match = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.MULTILINE)
    return match.group(1) if match else platform.processor() or "unknown"


def _memory_gib() -> float:
    match = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    return round(int(match.group(1)) / 1024**2, 1) if match else 0.0


def _debian() -> str:
    release = dict(
        line.split("=", 1) for line in _read("/etc/os-release").splitlines() if "=" in line
    )
    name = release.get("PRETTY_NAME", "").strip('"') or "unknown"
    point = _read("/etc/debian_version")
    return f"{name} ({point})" if point else name


def describe() -> dict[str, object]:
    """The machine: CPU, cores, memory, kernel, distribution, TCP settings."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "os": _debian(),
        "virtualization": _output(["systemd-detect-virt"], any_status=True) or "unknown",
        "tcp_congestion_control": _read("/proc/sys/net/ipv4/tcp_congestion_control"),
        "ip_local_port_range": " ".join(_read("/proc/sys/net/ipv4/ip_local_port_range").split()),
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
    }


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else "not found"


def _python_module_version(python: str, statement: str, env: dict[str, str] | None = None) -> str:
    return _first_line(_output([python, "-c", statement], env=env))


def _git(repo: Path, *args: str) -> str:
    return _output(["git", "-C", str(repo), *args])


def fastpoetry_version(src: Path) -> str:
    """fastpoetry.__version__ as imported from the copy in ``src``, on the servers' interpreter."""
    env = dict(os.environ, PYTHONPATH=str(src))
    return _python_module_version(servers.SYSTEM_PYTHON, "import fastpoetry; print(fastpoetry.__version__)", env)


def versions(paths: servers.Paths, source_hash: str) -> dict[str, str]:
    """Versions of the servers under test and of the tools that measure them.

    ``source_hash`` identifies the copy of fastpoetry's source the run
    measures, which may differ from the commit when src/ has changes.
    """
    system = servers.SYSTEM_PYTHON
    venv_python = str(paths.venv / "bin" / "python")
    commit = _git(paths.repo, "rev-parse", "--short", "HEAD")
    if not commit:
        commit, dirty = "unknown (not a git work tree)", ""
    else:
        dirty = " with uncommitted changes" if _git(paths.repo, "status", "--porcelain", "--", "src") else ""
    version = fastpoetry_version(paths.fastpoetry_src)
    return {
        "fastpoetry": f"{version} (commit {commit}{dirty}; source {source_hash})",
        "python (servers)": _python_module_version(system, "import sys; print(sys.version.split()[0])"),
        "trio": _python_module_version(system, "import trio; print(trio.__version__)"),
        "systemd-python": _python_module_version(system, "import systemd.daemon as d; print(d.__version__)"),
        "systemd": _first_line(_output(["systemd-socket-activate", "--version"])).removeprefix("systemd "),
        "twisted": _python_module_version(venv_python, "import twisted; print(twisted.__version__)"),
        "python (twisted)": _python_module_version(venv_python, "import sys; print(sys.version.split()[0])"),
        "nginx": _first_line(_output(["nginx", "-v"])).removeprefix("nginx version: nginx/"),
        "gcc": _first_line(_output(["gcc", "-dumpfullversion"])),
        # The TLS section: the library the servers' Python, nginx and loadgen -T all load (Debian's libssl3).
        "openssl": _python_module_version(system, "import ssl; print(ssl.OPENSSL_VERSION)").removeprefix("OpenSSL "),
        "matplotlib": _python_module_version(venv_python, "import matplotlib; print(matplotlib.__version__)"),
    }

"""Fixtures for the tests in ``tests/``: servers, a NOTIFY_SOCKET, namespaces.

Only fixtures live here; the helpers they are built on, and everything a
test module imports, are in ``helpers.py`` (no test module imports this
file).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from helpers import NamespacesUnavailable, NoLocalhost, NotifySocket, Server


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A NOTIFY_SOCKET of the test's own, closed at teardown."""
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``fastpoetry ARGS...``; every server is killed at teardown."""
    servers: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None, **popen: object) -> Server:
        server = Server(list(args), tmp_path / f"server-{len(servers)}.log", env=env, **popen)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def serve_foreground(start_server):  # type: ignore[no-untyped-def]
    """Start ``fastpoetry serve`` on 127.0.0.1, a free port; wait until ready."""

    def serve(*args: str, env: dict[str, str] | None = None) -> Server:
        server = start_server("serve", "--iface", "127.0.0.1", "--port", "0", *args, env=env)
        server.wait_ready()
        return server

    return serve


@pytest.fixture
def no_localhost(tmp_path: Path) -> Iterator[Callable[..., NoLocalhost]]:
    """Make NoLocalhost(ipv6=True) namespaces; closed at teardown.

    Making namespaces and mounting take root: without it, or without
    unshare, nsenter and ip, the test skips, except under CI=true, where it
    fails instead.
    """
    ci = os.environ.get("CI") == "true"

    def unavailable(reason: str) -> NoReturn:
        if ci:
            pytest.fail(f"{reason}; CI=true, so the test may not skip")
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("needs root to hide /etc/hosts in a mount namespace of its own")
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        unavailable(f"needs {', '.join(missing)} (packages util-linux and iproute2)")
    made: list[NoLocalhost] = []

    def make(ipv6: bool = True) -> NoLocalhost:
        try:
            made.append(NoLocalhost(tmp_path / f"no-localhost-{len(made)}", ipv6=ipv6))
        except NamespacesUnavailable as exc:
            unavailable(str(exc))
        return made[-1]

    yield make
    for namespaces in made:
        namespaces.close()


@pytest.fixture
def poetry_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """Capture the package's records at DEBUG, even if logs.setup cut propagation."""
    monkeypatch.setattr(logging.getLogger("fastpoetry"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="fastpoetry")
    return caplog

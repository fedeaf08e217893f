"""The systemd units in packaging/systemd, checked on the host.

They are also installed and run under real systemd by tests/system/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, WAIT

UNITS = REPO / "packaging" / "systemd"
SERVICE = UNITS / "fastpoetry.service"
SOCKET = UNITS / "fastpoetry.socket"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze (package systemd) is not installed"
)


def settings(unit: Path) -> dict[str, dict[str, list[str]]]:
    """The unit's sections and settings, every value of repeated keys kept."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


@needs_analyze
def test_service_exposure_is_at_most_one() -> None:
    """systemd-analyze security rates the service 1.0 or lower."""
    output = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(SERVICE)],
        capture_output=True, text=True, timeout=WAIT, check=True,
    ).stdout
    match = re.search(r"Overall exposure level for fastpoetry\.service: (\d+\.\d+)", output)
    assert match, output
    assert float(match.group(1)) <= 1.0, output


def test_service_is_a_notify_service_run_as_its_own_user() -> None:
    """Type=notify, User=/Group=fastpoetry, a reload command and a watchdog."""
    service = settings(SERVICE)["Service"]
    assert service["Type"] == ["notify"]
    assert service["User"] == ["fastpoetry"] and service["Group"] == ["fastpoetry"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["ExecStart"][0].startswith("/usr/bin/fastpoetry serve --poem /usr/share/fastpoetry/poems/")
    assert service["Restart"] == ["on-failure"] and "WatchdogSec" in service
    # The socket starts the service: it has no [Install] of its own.
    assert "Install" not in settings(SERVICE)


def test_socket_is_named_and_wanted_by_sockets_target() -> None:
    """ListenStream=10000, a FileDescriptorName=, and enabled via sockets.target."""
    socket_unit = settings(SOCKET)
    assert socket_unit["Socket"]["ListenStream"] == ["10000"]
    assert socket_unit["Socket"]["FileDescriptorName"] == ["poetry"]
    assert socket_unit["Install"]["WantedBy"] == ["sockets.target"]


def test_packaged_poem_exists() -> None:
    """The poem ExecStart= names is one the package installs from poems/."""
    command = settings(SERVICE)["Service"]["ExecStart"][0]
    installed = Path(command.split("--poem ")[1].split()[0])
    assert (REPO / "poems" / installed.name).is_file()
    install = (REPO / "packaging" / "debian" / "fastpoetry.install").read_text()
    assert "poems/*.txt usr/share/fastpoetry/poems/" in install

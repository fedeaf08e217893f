"""piuparts on each suite: the package installs, purges without a trace,
and upgrades from the previous release (0.1.0, built for Debian 12).

tools/piuparts runs Debian's piuparts in a fresh chroot of the suite (a
chroot, not a booted system: the maintainer scripts' systemd parts are
skipped there, which the booted tests cover) and names each leftover it
ignores, with the reason it is not the package's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import REPO, Builder, Package, run_logged

pytestmark = pytest.mark.system


def test_piuparts_install_purge_and_upgrade_from_the_previous_release(
    request: pytest.FixtureRequest, suite: str, package: Package, builder: Builder, tmp_path: Path
) -> None:
    """piuparts passes: install, remove, purge, and the upgrade from 0.1.0 to this suite's build."""
    previous = builder.release()
    run_logged(
        request.config,
        [str(REPO / "tools/piuparts"), "--suite", suite, "--deb", str(package.path), "--previous", str(previous.path)],
        tmp_path / "piuparts.log",
        f"piuparts on {suite}: {package.path.name}, and the upgrade from {previous.path.name}",
        timeout=3600,
    )

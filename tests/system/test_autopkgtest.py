"""The package's autopkgtest (debian/tests), run by autopkgtest itself.

autopkgtest's ``null`` backend runs the tests on the machine it runs on.
On the host that cannot show socket activation (systemd is not PID 1
there); inside the booted box it can: the box is the testbed, with systemd
as its init.  The smoke test declares ``isolation-container`` (it starts
system services), which the null backend cannot promise in general; here
the testbed is a container of its own, made for this test, so that
restriction is met and is passed to ``--ignore-restrictions``.
"""

from __future__ import annotations

import re

import pytest

from .helpers import REPO, SCRATCH, Container, Package

pytestmark = pytest.mark.system

#: What runs it: autopkgtest, and dpkg-dev, which it needs to read an
#: unbuilt source tree (the box has no network: both are in its apt cache).
AUTOPKGTEST = ("autopkgtest", "dpkg-dev")

#: Where the source's debian/ directory goes inside the box: autopkgtest
#: reads debian/control and debian/tests from an unbuilt source tree.
SOURCE = f"{SCRATCH}/source"


def test_autopkgtest_smoke_passes_under_systemd(container: Container, package: Package) -> None:
    """autopkgtest runs debian/tests/smoke against the installed package: it passes."""
    container.run("apt-get", "install", "-y", "--no-install-recommends", *AUTOPKGTEST, timeout=600)
    for path in sorted((REPO / "packaging/debian").rglob("*")):
        if path.is_file():
            relative = path.relative_to(REPO / "packaging/debian")
            container.write(f"{SOURCE}/debian/{relative}", path.read_bytes())
    container.run("chmod", "+x", f"{SOURCE}/debian/tests/smoke", f"{SOURCE}/debian/rules")
    deb = f"{SCRATCH}/{package.path.name}"
    container.write(deb, package.path.read_bytes())
    try:
        done = container.run(
            "autopkgtest", "--ignore-restrictions=isolation-container", f"--output-dir={SCRATCH}/autopkgtest-out",
            deb, f"{SOURCE}/", "--", "null", check=False, timeout=600,
        )
        said = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, f"autopkgtest failed ({done.returncode}):\n{said}"
        assert re.search(r"^smoke\s+PASS", said, re.M), said
        for line in ("ok: fastpoetry.socket is enabled and listening", "ok: a client got", "runs as fastpoetry",
                     "ok: the journal has"):
            assert line in said, f"no {line!r} in:\n{said}"
    finally:
        container.run("rm", "-rf", SOURCE, f"{SCRATCH}/autopkgtest-out")
        container.run("systemctl", "stop", "fastpoetry.service")

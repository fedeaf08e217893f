"""From release 0.1.0 on Debian 12 to this version on Debian 13, serving throughout.

An administrator's path, in a booted Debian 12 box of its own, in order:

1. 0.1.0, the previous release, serves; it is upgraded to the package
   built for 12 while clients fetch.
2. The sources move to trixie and ``apt-get dist-upgrade`` brings systemd
   257 and Python 3.13 while the server runs.
3. The package built for 13 replaces the one built for 12, and its units
   move from /lib (Debian 12's place) to /usr/lib (13's: /lib is only an
   alias there, DEP 17).

Afterwards every unit file is still there and dpkg knows it, the socket is
enabled and listening, the next client starts the service and gets the
poem, no unit has failed, and the package's modules are compiled for the
new Python.

The box has no network once booted (as every test box): the trixie
packages are downloaded into its apt cache before it boots, so its apt
already reads trixie's package lists in step 1 (installing a local .deb
whose dependencies are met upgrades nothing else).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import (
    PACKAGED_POEM,
    SCRATCH,
    UNIT_DIRECTORY,
    UNITS,
    Builder,
    ClientLoop,
    Container,
    Package,
    compiled_modules,
    installed_box,
    new_main_pid,
    run_logged,
)

pytestmark = pytest.mark.system


def apt_sources_to_trixie(root: Path) -> None:
    """Point the box's apt at trixie, as the release notes tell an administrator to."""
    sources = root / "etc/apt/sources.list"
    text = sources.read_text()
    assert "bookworm" in text, text
    sources.write_text(text.replace("bookworm", "trixie"))


@pytest.fixture(scope="module")
def bookworm_box(request: pytest.FixtureRequest, builder: Builder) -> Iterator[Container]:
    """A booted Debian 12 box serving release 0.1.0, with trixie's packages and both builds at hand."""
    box = installed_box(request.config, "bookworm", [builder.release()], name="dist-upgrade")
    try:
        apt_sources_to_trixie(box.root)
        for argv, what in (
            (["apt-get", "update", "-qq"], "Reading trixie's package lists into the Debian 12 box"),
            (["apt-get", "dist-upgrade", "-y", "-qq", "--download-only"],
             "Downloading the packages of the dist-upgrade to trixie into the box's apt cache"),
        ):
            run_logged(request.config, ["chroot", str(box.root), *argv], box.directory / "prepare.log", what,
                       timeout=1800)
        for suite in ("bookworm", "trixie"):
            package = builder.package(suite)
            (box.root / SCRATCH.lstrip("/") / package.path.name).write_bytes(package.path.read_bytes())
        box.boot()
        yield box
    finally:
        box.destroy()


def upgrade_under_load(box: Container, package: Package) -> None:
    """``apt-get install`` ``package`` while two clients fetch: none fails, and it is installed."""
    poem = PACKAGED_POEM.read_bytes()
    with ClientLoop(box, [poem], threads=2) as loop:
        loop.more(50)
        box.run("apt-get", "install", "-y", f"{SCRATCH}/{package.path.name}", timeout=600)
        loop.more(50)
        summary = loop.stop()
    assert summary["failed"] == 0, f"fetches failed during the upgrade to {package.version}: {summary}"
    assert box.text("dpkg-query", "-W", "-f", "${Version}", "fastpoetry") == package.version


def test_upgrade_from_release_0_1_0_on_debian_12_keeps_serving(bookworm_box: Container, builder: Builder) -> None:
    """0.1.0 -> this version's Debian 12 build under load: no failed client, the new code serves."""
    box = bookworm_box
    release = builder.release()
    assert box.text("dpkg-query", "-W", "-f", "${Version}", "fastpoetry") == release.version
    assert box.fetch() == PACKAGED_POEM.read_bytes()
    assert f"fastpoetry {release.version} starting" in box.journal(f"_PID={box.main_pid()}")
    old_pid = box.main_pid()
    upgrade_under_load(box, builder.package("bookworm"))
    assert box.fetch() == PACKAGED_POEM.read_bytes()
    pid = new_main_pid(box, old_pid)
    assert f"fastpoetry {builder.package('bookworm').version.split('+')[0]} starting" in box.journal(f"_PID={pid}")
    assert box.text("systemctl", "is-enabled", "fastpoetry.socket") == "enabled"


def test_dist_upgrade_12_to_13_then_the_13_build_keeps_serving(
    bookworm_box: Container, builder: Builder
) -> None:
    """12 -> 13 with the server serving, then the 13 build: units moved, socket kept, bytecode for 3.13."""
    box = bookworm_box
    poem = PACKAGED_POEM.read_bytes()
    bookworm, trixie = builder.package("bookworm"), builder.package("trixie")
    assert box.text("dpkg-query", "-W", "-f", "${Version}", "fastpoetry") == bookworm.version
    assert box.fetch() == poem
    old_pid = box.main_pid()

    # The dist-upgrade, while clients fetch: the server keeps its code in
    # memory and serves on.
    with ClientLoop(box, [poem], threads=2) as loop:
        loop.more(50)
        box.run("apt-get", "dist-upgrade", "-y", "-o", "Dpkg::Options::=--force-confold", timeout=1800)
        loop.more(50)
        summary = loop.stop()
    assert summary["failed"] == 0, f"fetches failed during the dist-upgrade: {summary}"
    assert box.text("sh", "-c", ". /etc/os-release && echo $VERSION_CODENAME") == "trixie"
    assert box.text("python3", "-c", "import sys; print(sys.version_info[:2] >= (3, 13))") == "True"
    # The 12 build is still installed; its modules must already be compiled
    # for the new Python (the unit cannot write bytecode): the package's
    # dpkg trigger on python3's defaults did it.
    modules, compiled = compiled_modules(box)
    assert compiled == modules, f"{compiled} of {modules} modules compiled for Python 3.13 after the dist-upgrade"

    # The 12 build to the 13 build: the units move from /lib to /usr/lib.
    upgrade_under_load(box, trixie)

    for unit in UNITS:
        path = f"{UNIT_DIRECTORY['trixie']}/{unit}"
        assert box.run("test", "-f", path, check=False).returncode == 0, f"{path} is gone after the upgrade"
        assert box.text("dpkg-query", "-S", path) == f"fastpoetry: {path}"
    assert box.text("systemctl", "is-enabled", "fastpoetry.socket") == "enabled"

    # The next client starts the service, on the new code.
    box.run("systemctl", "stop", "fastpoetry.service")
    assert box.is_active("fastpoetry.service") == "inactive"
    assert box.show("fastpoetry.socket", "SubState") == "listening"
    assert box.fetch() == poem
    new_pid = new_main_pid(box, old_pid)
    assert f"fastpoetry {trixie.version.split('+')[0]} starting" in box.journal(f"_PID={new_pid}")
    failed = box.text("systemctl", "list-units", "--failed", "--plain", "--no-legend")
    assert failed == "", f"failed units after the upgrade:\n{failed}"
    modules, compiled = compiled_modules(box)
    assert compiled == modules, f"{compiled} of {modules} modules compiled for Python 3.13 after the upgrade"

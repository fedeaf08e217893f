"""System tests: the freshly built Debian package under a real systemd, on
Debian 12 (bookworm) and Debian 13 (trixie).

Each suite's package is built inside a fresh root of that suite (a copy of
debootstrap's minbase, nothing installed) by ``tools/build-deb``, as a new
administrator would build it.  For each suite in turn, a session copies a
cached base image of that suite, installs the package into the copy, boots
it with ``systemd-nspawn --boot`` (systemd is PID 1 inside) and hands the
tests a :class:`Container`: every test that takes it runs once per suite,
its id naming the suite.  Everything the tests do happens inside, through
``nsenter``: systemctl, journalctl, apt-get and the poetry clients (the
container has a private network with only ``lo``).

The base images and build roots (debootstrap) are made once and cached
under ``/var/cache/fastpoetry-tests`` (``FASTPOETRY_TEST_CACHE`` moves it),
keyed by what goes into them, with the .debs apt downloads for builds and
the previous release's package.  Containers and build roots live under
``/var/tmp/fastpoetry-system-tests`` and are removed at the end, also after a
failure; one left behind by a killed session is removed by the next.
``FASTPOETRY_TEST_SUITES=trixie`` limits a local run to one suite; under CI
both always run.

The tests need root.  Without it they skip, except under CI (``CI=true``),
where a skip would hide them: there they fail instead, and missing host
tools are installed.

This directory is a package (``__init__.py``) so that this module is
``system.conftest`` and its helpers ``system.helpers``, apart from the
top-level ``conftest`` and ``helpers`` of ``tests/``.  Only fixtures and
hooks live here; everything else, and all a test module imports, is in
``helpers.py``.

Every wait has a generous limit that only turns a hang into a failure; no
test asserts how fast anything is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from .helpers import (
    HOST_ENV,
    HOST_TOOLS,
    SCRATCH,
    Builder,
    Container,
    Package,
    installed_box,
    remove_stale_runs,
    say,
    suites_to_test,
)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``system`` marker."""
    config.addinivalue_line(
        "markers",
        "system: boots the Debian package under systemd in a container (root, systemd-nspawn, debootstrap)",
    )


# ----------------------------------------------------------------------------
# The host: root and tools


@pytest.fixture(scope="session")
def system_host(request: pytest.FixtureRequest) -> None:
    """Skip (locally) or fail (CI=true) unless root; install missing host tools."""
    ci = os.environ.get("CI") == "true"
    if os.geteuid() != 0:
        reason = "the system tests need root: they boot the package in a systemd-nspawn container"
        if ci:
            pytest.fail(f"{reason}; CI=true, so they may not skip")
        pytest.skip(reason)
    missing = sorted({package for tool, package in HOST_TOOLS.items() if shutil.which(tool, path=HOST_ENV["PATH"]) is None})
    if missing:
        if shutil.which("apt-get", path=HOST_ENV["PATH"]) is None:
            reason = f"the system tests need the packages {', '.join(missing)} and there is no apt-get"
            if ci:
                pytest.fail(reason)
            pytest.skip(reason)
        say(request.config, f"installing {' '.join(missing)} for the system tests")
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
            done = subprocess.run(argv, env=HOST_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    remove_stale_runs()


@pytest.fixture(scope="session")
def builder(request: pytest.FixtureRequest, system_host: None, tmp_path_factory: pytest.TempPathFactory) -> Builder:
    """Builds the packages of the session, each once, into a temporary directory."""
    return Builder(request.config, tmp_path_factory.mktemp("debs"))


@pytest.fixture(scope="session", params=suites_to_test())
def suite(request: pytest.FixtureRequest) -> str:
    """The Debian release under test: every test that boots the package runs once per suite."""
    return request.param


@pytest.fixture(scope="session")
def package(builder: Builder, suite: str) -> Package:
    """The package built in a fresh root of the suite under test."""
    return builder.package(suite)


# ----------------------------------------------------------------------------
# The container


@pytest.fixture(scope="session")
def container(request: pytest.FixtureRequest, suite: str, package: Package) -> Iterator[Container]:
    """A copy of the suite's base image with the suite's package installed, booted.

    One container per suite serves the whole session; tests run in file
    order and leave it as they found it, apart from what they are about.
    """
    box = installed_box(request.config, suite, [package])
    try:
        say(request.config, f"booting {box.root} with systemd-nspawn")
        box.boot()
        yield box
    finally:
        box.destroy()


@pytest.fixture(scope="module")
def installed(container: Container, package: Package) -> Iterator[Container]:
    """The container with the package installed, as it was booted.

    For the modules that run after test_system.py, which ends by purging
    the package: it is installed again for the module and purged after.
    """
    status = container.text("dpkg-query", "-W", "-f", "${Status}", "fastpoetry", check=False)
    reinstall = status != "install ok installed"
    if reinstall:  # test_system.py purged it
        deb = f"{SCRATCH}/{package.path.name}"
        container.write(deb, package.path.read_bytes())
        container.run("apt-get", "install", "-y", deb, timeout=600)
    try:
        yield container
    finally:
        if reinstall:
            container.run("apt-get", "purge", "-y", "fastpoetry", timeout=600)


# ----------------------------------------------------------------------------

"""tools/build-deb in a fresh root of each suite, as a new administrator runs it.

The root is debootstrap's minbase and nothing else: no dpkg-dev, no
debhelper, no git.  The build must install what it needs and pass that
suite's lintian with no error and no warning the first time.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from .helpers import HOST_ENV, SUITES, Builder, Package, upstream_version

pytestmark = pytest.mark.system


def test_build_deb_works_the_first_time_and_lintian_is_clean(suite: str, package: Package, builder: Builder) -> None:
    """First run in a fresh root: build dependencies installed, a .deb versioned for the suite, lintian clean."""
    log = builder.logs[suite].read_text(errors="replace")
    assert "== installing dpkg-dev lintian git" in log, log
    assert "== installing the build dependencies (apt-get build-dep)" in log, log
    assert re.search(r"^== lintian \S+$", log, re.M), log
    tags = re.findall(r"^([EW]): fastpoetry.*$", log, re.M)
    assert tags == [], log
    assert package.version == f"{upstream_version()}+deb{SUITES[suite]}"
    assert package.path.name == f"fastpoetry_{package.version}_all.deb"


def test_each_suite_has_its_own_version_and_13_sorts_higher(builder: Builder) -> None:
    """Release 0.1.0 < the 12 build < the 13 build, as dpkg orders them: upgrades go 12 -> 13."""
    versions = [builder.release().version, builder.package("bookworm").version, builder.package("trixie").version]
    for older, newer in zip(versions, versions[1:]):
        compared = subprocess.run(["dpkg", "--compare-versions", older, "lt", newer], env=HOST_ENV, check=False)
        assert compared.returncode == 0, f"{older} does not sort before {newer}"

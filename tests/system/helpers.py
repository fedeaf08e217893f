"""Helpers of the system tests: the host, cached roots, the package, the
container and the clients run inside it (see conftest.py for how it all
fits together).

A plain module: the test modules here import what they use from it
(``from .helpers import ...``), and ``conftest.py`` keeps only the fixtures
and hooks, built on these.  The generic waiting is shared with the tests
in ``tests/``: pytest puts ``tests/`` (the directory above this package)
on ``sys.path``, so ``helpers`` there is importable as a top-level module.

Every wait has a generous limit that only turns a hang into a failure; no
test asserts how fast anything is.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

# tests/helpers.py, not this module's namesake: tests/ is on sys.path (see above).
import helpers as shared

REPO = Path(__file__).resolve().parents[2]
POEMS = REPO / "poems"

#: Seconds after which a wait is a failure (a hang guard, not a speed limit).
WAIT = 120.0

#: The port fastpoetry.socket listens on.
PORT = 10000

#: The Debian releases the package is built for and tested on, with their
#: version numbers.  Each is built and booted in a root of its own.
SUITES = {"bookworm": "12", "trixie": "13"}
#: Installed into the base image on top of debootstrap's minbase.  man-db lets
#: ``systemd-analyze verify`` check the units' Documentation=man:... pages.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-trio",
    "python3-systemd",
    "man-db",
)
#: Downloaded into the base image's apt cache but not installed, so that
#: apt installs them in a booted box, which has no network: procps, a
#: dependency of the package that a minimal system lacks (installing the
#: package pulls it in as apt would), and autopkgtest with the dpkg-dev it
#: needs for a source tree, to run the package's debian/tests.
BASE_DOWNLOADS = ("procps", "autopkgtest", "dpkg-dev")
#: Downloaded with their Recommends, which a plain ``apt-get install
#: fastpoetry`` (the README's, from the repository) installs too: procps
#: recommends psmisc, and on 13 also linux-sysctl-defaults.
BASE_DOWNLOADS_WITH_RECOMMENDS = ("procps",)

CACHE = Path(os.environ.get("FASTPOETRY_TEST_CACHE", "/var/cache/fastpoetry-tests"))
RUNS = Path("/var/tmp/fastpoetry-system-tests")
PROPAGATE = Path("/run/systemd/nspawn/propagate")

#: Host tools the tests use, and the Debian packages that have them.
HOST_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "nsenter": "util-linux",
    "dpkg-deb": "dpkg",
    "chroot": "coreutils",
    "apt-ftparchive": "apt-utils",
    "gpg": "gpg",
    "gpg-agent": "gpg-agent",
    "gpgv": "gpgv",
    "xz": "xz-utils",
}

#: The environment of host commands: Debian's tools, not a virtualenv's.
HOST_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}

#: The whole environment of a command run inside the container.
INNER_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "HOME=/root",
    "TERM=dumb",
    "SYSTEMD_COLORS=0",
    "SYSTEMD_PAGER=",
    "DEBIAN_FRONTEND=noninteractive",
)

#: Where the tests put their own files inside the container.
SCRATCH = "/var/tmp/fastpoetry-tests"


# ----------------------------------------------------------------------------
# Small helpers


def say(config: pytest.Config, message: str) -> None:
    """Show ``message`` on the terminal now, even while output is captured."""
    line = f"\n[system tests] {message}\n"
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        sys.__stderr__.write(line)
        sys.__stderr__.flush()
        return
    with capman.global_and_fixture_disabled():
        sys.stderr.write(line)
        sys.stderr.flush()


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT, interval: float = 0.1) -> Any:
    """tests/helpers.py's wait_until, with this package's longer WAIT and a slower poll."""
    # Each poll here runs a command inside the container: 0.1 s apart, not 0.02.
    return shared.wait_until(predicate, what, timeout=timeout, interval=interval)


def sha256(data: bytes) -> str:
    """The SHA-256 of ``data``, in hex."""
    return hashlib.sha256(data).hexdigest()


def _tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, for a failure message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


def run_logged(config: pytest.Config, argv: list[str], log: Path, what: str, timeout: float) -> None:
    """Run a long host command, its output going to ``log``; tell the user."""
    say(config, f"{what} (log: {log})")
    started = time.monotonic()
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=HOST_ENV)
        try:
            next_note = started + 30
            while process.poll() is None:
                now = time.monotonic()
                if now - started > timeout:
                    process.kill()
                    process.wait()
                    raise AssertionError(f"{what}: no end within {timeout:g} s; log {log}:\n{_tail(log)}")
                if now > next_note:
                    say(config, f"... still {what[0].lower()}{what[1:]} ({now - started:.0f} s)")
                    next_note = now + 30
                time.sleep(0.2)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if process.returncode != 0:
        raise AssertionError(f"{what}: {argv[0]} failed ({process.returncode}); log {log}:\n{_tail(log)}")
    say(config, f"{what}: done in {time.monotonic() - started:.0f} s")


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in our mount namespace, deepest first."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _processes_rooted_in(path: Path) -> list[int]:
    """Processes whose root directory is ``path`` or below (a live container)."""
    prefix = str(path).rstrip("/")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            root = os.readlink(f"/proc/{entry}/root")
        except OSError:
            continue
        if root == prefix or root.startswith(prefix + "/"):
            pids.append(int(entry))
    return pids


def remove_tree(path: Path) -> None:
    """Remove a container or image tree: unmount what is left in it, then delete.

    ``rm --one-file-system`` never descends into a mount that could not be
    taken away (such as a /proc debootstrap left behind).
    """
    if not path.exists() and not path.is_symlink():
        return
    users = _processes_rooted_in(path)
    if users:
        raise AssertionError(f"not removing {path}: processes {users} still run in it")
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], env=HOST_ENV, check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], env=HOST_ENV, check=True)
    if path.exists():
        raise AssertionError(f"could not remove {path}")


# ----------------------------------------------------------------------------
# Runs that killed sessions left behind


def remove_stale_runs() -> None:
    """Remove containers that sessions which no longer exist left behind."""
    if not RUNS.is_dir():
        return
    for run in RUNS.iterdir():
        match = re.fullmatch(r"[a-z0-9-]+?-(\d+)-[0-9a-f]+", run.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and Path(f"/proc/{pid}").exists():
            continue  # that session is still running
        if _processes_rooted_in(run):
            continue  # its container still runs: leave it to whoever owns it
        with contextlib.suppress(OSError, AssertionError, subprocess.CalledProcessError):
            remove_tree(run)
            remove_tree(PROPAGATE / run.name)


# ----------------------------------------------------------------------------
# Cached trees: the base images and the build roots


#: A cached tree of another recipe is removed once it is this many seconds
#: old: long enough for a session still copying it to finish.
STALE_TREE_AGE = 3600


def _cached_tree(config: pytest.Config, family: str, key: str, make: Callable[[Path, Path], None]) -> Path:
    """``CACHE/family-key``, made by ``make(target, log)`` if it is not there yet.

    It is made next to its cache entry and renamed into place only when
    complete, under a lock, so an interrupted or concurrent build never
    leaves half a tree where a session would use it.  Trees of the same
    family with another key (an older recipe) are removed then.
    """
    name = f"{family}-{key}"
    final = CACHE / name
    if final.is_dir():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        for stale in CACHE.glob(".build-*"):
            remove_tree(stale)  # we hold the lock: nobody is building it
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
        log = final.with_name(final.name + ".log")
        log.unlink(missing_ok=True)
        try:
            target = work / "root"
            say(config, f"{final} is not cached yet: making it once")
            make(target, log)
            os.rename(target, final)
        finally:
            remove_tree(work)
        for other in CACHE.glob(f"{family}-*"):
            if other.is_dir() and other != final and time.time() - other.stat().st_mtime > STALE_TREE_AGE:
                with contextlib.suppress(OSError, AssertionError, subprocess.CalledProcessError):
                    remove_tree(other)
                    other.with_name(other.name + ".log").unlink(missing_ok=True)
    return final


def _key(recipe: dict[str, Any]) -> str:
    """A short digest of what goes into a cached tree, naming it."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def base_image(config: pytest.Config, suite: str) -> Path:
    """The cached base image of ``suite`` that containers are copied from."""
    recipe = {"suite": suite, "variant": "minbase", "include": sorted(BASE_PACKAGES),
              "download": sorted(BASE_DOWNLOADS), "recommended": sorted(BASE_DOWNLOADS_WITH_RECOMMENDS),
              "recipe": 2}

    def make(target: Path, log: Path) -> None:
        run_logged(
            config,
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(target)],
            log, f"Building the {suite} base image with debootstrap (a few minutes)", timeout=3600,
        )
        run_logged(
            config,
            ["chroot", str(target), "apt-get", "install", "-y", "--download-only", "--no-install-recommends",
             *BASE_DOWNLOADS],
            log, f"Downloading {' '.join(BASE_DOWNLOADS)} into the {suite} base image's apt cache", timeout=1800,
        )
        run_logged(
            config,
            ["chroot", str(target), "apt-get", "install", "-y", "--download-only", *BASE_DOWNLOADS_WITH_RECOMMENDS],
            log, f"Downloading {' '.join(BASE_DOWNLOADS_WITH_RECOMMENDS)} and what it recommends", timeout=1800,
        )

    return _cached_tree(config, f"base-{suite}", _key(recipe), make)


def image_with(config: pytest.Config, suite: str, packages: Iterable[str]) -> Path:
    """The cached base image of ``suite`` with ``packages`` installed from the suite's archive.

    For boxes that need more than the package (HAProxy in front of a
    fleet): apt runs in a chroot of a copy of the base image once, with
    the host's network; a booted box has none.  Keyed by the base image
    and the packages, so a new base image makes a new one.
    """
    wanted = sorted(packages)
    base = base_image(config, suite)
    recipe = {"base": base.name, "packages": wanted, "recipe": 1}

    def make(target: Path, log: Path) -> None:
        subprocess.run(["cp", "-a", str(base), str(target)], env=HOST_ENV, check=True)
        run_logged(config, ["chroot", str(target), "apt-get", "update", "-qq"], log,
                   f"Reading {suite}'s package lists into a copy of the base image", timeout=1800)
        run_logged(config, ["chroot", str(target), "apt-get", "install", "-y", "--no-install-recommends", *wanted],
                   log, f"Installing {' '.join(wanted)} into it", timeout=1800)

    return _cached_tree(config, f"image-{suite}-{'-'.join(wanted)}", _key(recipe), make)


def build_root(config: pytest.Config, suite: str) -> Path:
    """The cached build root of ``suite``: debootstrap's minbase and nothing else.

    Builds run in a copy, so each one starts as a fresh machine would:
    tools/build-deb itself installs everything it needs.
    """

    def make(target: Path, log: Path) -> None:
        run_logged(config, ["debootstrap", "--variant=minbase", suite, str(target)], log,
                   f"Building the {suite} build root with debootstrap (a minute or two)", timeout=3600)

    return _cached_tree(config, f"build-{suite}", _key({"suite": suite, "variant": "minbase", "recipe": 1}), make)


def apt_archives(suite: str) -> Path:
    """A host folder that keeps ``suite``'s downloaded .debs between runs.

    Bound over a build root's /var/cache/apt/archives: apt still installs
    every package (the build still starts from nothing), it only downloads
    each file once per machine.
    """
    folder = CACHE / f"apt-archives-{suite}"
    (folder / "partial").mkdir(parents=True, exist_ok=True)
    return folder


# ----------------------------------------------------------------------------
# The packages


@dataclass(frozen=True)
class Package:
    """A built .deb, the version in it, and the Debian release it was built in."""

    path: Path
    version: str
    suite: str


def upstream_version() -> str:
    """fastpoetry.__version__, as the server logs it."""
    text = (REPO / "src/fastpoetry/__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert match, "no __version__ in src/fastpoetry/__init__.py"
    return match.group(1)


def repack(package: Package, directory: Path, version: str) -> Package:
    """A copy of ``package`` that says it is ``version``, also to the server.

    The control file's Version changes, and so does fastpoetry.__version__,
    which the server logs when it starts: the journal then tells which code
    a running server is.
    """
    tree = directory / "tree"
    subprocess.run(["dpkg-deb", "-R", str(package.path), str(tree)], env=HOST_ENV, check=True)
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), count=1, flags=re.M))
    module = "usr/lib/python3/dist-packages/fastpoetry/__init__.py"
    init = tree / module
    text, changed = re.subn(r'^__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text(), flags=re.M)
    assert changed == 1, f"no __version__ in {module}"
    init.write_text(text)
    md5sums = tree / "DEBIAN/md5sums"
    digest = hashlib.md5(init.read_bytes()).hexdigest()
    md5sums.write_text(re.sub(rf"^\S+(  {re.escape(module)})$", rf"{digest}\1", md5sums.read_text(), flags=re.M))
    deb = directory / f"fastpoetry_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)],
                   env=HOST_ENV, check=True, capture_output=True)
    return Package(deb, version, package.suite)


def export_tree(destination: Path, revision: str | None = None) -> None:
    """The tracked files of this checkout (or of ``revision``) as a git checkout of their own.

    tools/build-deb builds from the files git tracks, so the copy gets a
    repository of its own with every file added; without ``revision`` the
    files are taken as they are in the work tree, uncommitted changes too.
    """
    destination.mkdir(parents=True)
    git = ["git", "-C", str(REPO)]
    if revision is None:
        listing = subprocess.run([*git, "ls-files", "-z"], env=HOST_ENV, capture_output=True, check=True).stdout
        archive = subprocess.run(["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"], input=listing,
                                 env=HOST_ENV, capture_output=True, check=True).stdout
    else:
        archive = subprocess.run([*git, "archive", revision], env=HOST_ENV, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-C", str(destination), "-xf", "-"], input=archive, env=HOST_ENV, check=True)
    for argv in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", "-C", str(destination), *argv], env=HOST_ENV, check=True, capture_output=True)


def nspawn_command(root: Path, *argv: str, binds: Iterable[str] = (), options: Iterable[str] = ()) -> list[str]:
    """Run ``argv`` in ``root`` under systemd-nspawn (not booted), with the host's network.

    ``options`` go to systemd-nspawn: ``--private-network`` for none,
    ``--chdir=DIR`` to start elsewhere than in /.
    """
    return [
        "systemd-nspawn", "--quiet", "--register=no", *Container.unit_option(), "--as-pid2", "--console=pipe",
        f"--machine={root.parent.name}", "--resolv-conf=copy-host", "--directory", str(root),
        *(f"--bind={bind}" for bind in binds), *options,
        "--setenv=LC_ALL=C.UTF-8", *argv,
    ]


@contextlib.contextmanager
def fresh_root(config: pytest.Config, suite: str) -> Iterator[Path]:
    """A copy of ``suite``'s build root (debootstrap's minbase), removed afterwards."""
    RUNS.mkdir(parents=True, exist_ok=True)
    work = RUNS / f"build-{suite}-{os.getpid()}-{secrets.token_hex(3)}"
    work.mkdir()
    try:
        subprocess.run(["cp", "-a", str(build_root(config, suite)), str(work / "root")], env=HOST_ENV, check=True)
        yield work / "root"
    finally:
        remove_tree(work)


#: The release the upgrade tests start from: fastpoetry 0.1.0, tagged v0.1.0,
#: named here by its commit, which every clone of main has (a tag may not
#: have been fetched).
RELEASE = ("0.1.0", "394fb84315992d9a4fc4f5867a8c459746616db4")


class Builder:
    """Builds the package, each suite's in a fresh root of that suite, once a session.

    :meth:`package` runs tools/build-deb inside a copy of the suite's build
    root (nothing but debootstrap's minbase), as a new administrator would
    on a fresh machine.  :meth:`release` is the previous release, built
    from its own tree with its own tools/build-deb in a Debian 12 root, and
    cached on the host, keyed by its commit.
    """

    def __init__(self, config: pytest.Config, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self._built: dict[str, Package] = {}
        #: Each suite's build log: tools/build-deb's output, lintian's included.
        self.logs: dict[str, Path] = {}

    def package(self, suite: str) -> Package:
        """The package of this tree for ``suite``, built once per session."""
        if suite not in self._built:
            with self._fresh_root(suite, f"{suite}-work-tree", None) as (root, out, binds):
                run_logged(self.config, nspawn_command(root, "/build/src/tools/build-deb", "/build/out", binds=binds),
                           out.parent / "build.log", f"Building the package in a fresh {suite} root with tools/build-deb",
                           timeout=1800)
            self.logs[suite] = out.parent / "build.log"
            debs = sorted(out.glob("fastpoetry_*_all.deb"))
            assert len(debs) == 1, f"tools/build-deb left {[p.name for p in out.iterdir()]} in {out}"
            self._built[suite] = Package(debs[0], debs[0].name.split("_")[1], suite)
        return self._built[suite]

    def release(self) -> Package:
        """The previous release, 0.1.0, as built for Debian 12."""
        version, commit = RELEASE
        cached = CACHE / f"release-{commit[:12]}" / f"fastpoetry_{version}_all.deb"
        if not cached.is_file():
            with self._fresh_root("bookworm", f"release-{commit[:12]}", commit) as (root, out, binds):
                log = out.parent / "build.log"
                # The release's tools/build-deb installed only part of the
                # build dependencies on a fresh machine (it asked dpkg which
                # were missing before dpkg-dev was there): install them first.
                deps = ("apt-get update -qq && apt-get install -y -qq --no-install-recommends dpkg-dev lintian git"
                        " && mkdir /tmp/release && cp -a /build/src/packaging/debian /tmp/release/debian"
                        " && apt-get build-dep -y -qq --no-install-recommends /tmp/release")
                run_logged(self.config, nspawn_command(root, "/bin/sh", "-c", deps, binds=binds), log,
                           f"Installing the build dependencies of release {version} in a fresh bookworm root", timeout=1800)
                run_logged(self.config, nspawn_command(root, "/build/src/tools/build-deb", "/build/out", binds=binds),
                           log, f"Building release {version} with its own tools/build-deb", timeout=1800)
            cached.parent.mkdir(parents=True, exist_ok=True)
            part = cached.with_suffix(".part")
            shutil.copy(out / cached.name, part)
            os.rename(part, cached)
        return Package(cached, version, "bookworm")

    @contextlib.contextmanager
    def _fresh_root(self, suite: str, name: str, revision: str | None) -> Iterator[tuple[Path, Path, tuple[str, ...]]]:
        """A fresh root of ``suite`` with the source exported into it.

        Yields the root, the host folder the build's output lands in, and
        the ``--bind`` arguments that put both (and the apt cache) inside.
        """
        folder = self.directory / name
        if folder.exists():  # an earlier attempt's, which failed
            shutil.rmtree(folder)
        source, out = folder / "src", folder / "out"
        out.mkdir(parents=True)
        export_tree(source, revision)
        with fresh_root(self.config, suite) as root:
            yield root, out, (f"{source}:/build/src", f"{out}:/build/out", f"{apt_archives(suite)}:/var/cache/apt/archives")


def suites_to_test() -> list[str]:
    """The suites to test: all, or those FASTPOETRY_TEST_SUITES names (not under CI)."""
    wanted = os.environ.get("FASTPOETRY_TEST_SUITES", "").split()
    if os.environ.get("CI") == "true" or not wanted:
        return list(SUITES)
    unknown = set(wanted) - set(SUITES)
    if unknown:
        raise pytest.UsageError(f"FASTPOETRY_TEST_SUITES: unknown suite(s) {sorted(unknown)}; known: {list(SUITES)}")
    return wanted


# ----------------------------------------------------------------------------
# The container


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the children of ``pid``, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            children.append((int(entry), name))
    return children


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _terminate_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent dies.

    systemd-nspawn halts its container on SIGTERM; killed outright it would
    leave the container running.  So a session that is killed (and cannot
    clean up) still stops its container, and the next one removes the tree.
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Container:
    """A Debian system booted with ``systemd-nspawn --boot`` in ``directory/root``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.machine = directory.name
        self.root = directory / "root"
        self.log_path = directory / "nspawn.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0
        #: What ``systemctl is-system-running --wait`` said after boot.
        self.boot_state = ""
        self._log: IO[bytes] | None = None
        #: The leader's start time: a PID used again later is not the leader.
        self._leader_started: int | None = None

    # -- running things inside

    def command(self, *argv: str) -> list[str]:
        """The host command line that runs ``argv`` inside, with a clean environment."""
        assert self.leader, "the container is not running"
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *INNER_ENV, *argv]

    def run(
        self, *argv: str, input: bytes | None = None, check: bool = True, timeout: float = WAIT
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside; with ``check``, fail unless it exits 0."""
        done = subprocess.run(
            self.command(*argv),
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
            env=HOST_ENV,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)!r} exited {done.returncode} in the container\n"
                f"stdout: {done.stdout.decode(errors='replace')}\nstderr: {done.stderr.decode(errors='replace')}"
            )
        return done

    def text(self, *argv: str, check: bool = True, timeout: float = WAIT) -> str:
        """Standard output of ``argv`` run inside, stripped."""
        return self.run(*argv, check=check, timeout=timeout).stdout.decode(errors="replace").strip()

    def python(self, script: str, *args: str, check: bool = True, timeout: float = WAIT) -> subprocess.CompletedProcess[bytes]:
        """Run a Python script with the container's python3."""
        return self.run("python3", "-c", script, *args, check=check, timeout=timeout)

    def write(self, path: str, data: bytes) -> None:
        """Write a root-owned file (mode 644) inside, creating its folder."""
        self.run("sh", "-c", 'umask 022 && mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path, input=data)

    def read(self, path: str) -> bytes:
        """The contents of ``path`` inside."""
        return self.run("cat", path).stdout

    # -- systemd

    def show(self, unit: str, prop: str) -> str:
        """Property ``prop`` of ``unit``, as ``systemctl show`` says."""
        return self.text("systemctl", "show", "-p", prop, "--value", unit)

    def main_pid(self, unit: str = "fastpoetry.service") -> int:
        """The unit's main PID inside (0: none)."""
        return int(self.show(unit, "MainPID") or 0)

    def is_active(self, unit: str) -> str:
        """``systemctl is-active``'s word for ``unit``: active, failed, ..."""
        return self.text("systemctl", "is-active", unit, check=False)

    def journal(self, *match: str, unit: str = "fastpoetry.service") -> str:
        """Messages of ``unit`` (or of the journal ``match`` if given), one per line."""
        selection = list(match) if match else ["-u", unit]
        return self.text("journalctl", "--no-pager", "-o", "cat", *selection)

    def wait_for_journal(self, text: str, *match: str, unit: str = "fastpoetry.service") -> str:
        """Wait until the journal has a message containing ``text``; return the journal."""
        found: list[str] = []

        def has() -> bool:
            found[:] = [self.journal(*match, unit=unit)]
            return text in found[0]

        try:
            wait_until(has, f"journal message {text!r}", timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\njournal:\n{found[0] if found else ''}") from None
        return found[0]

    def reset_failed(self) -> None:
        """Forget past failures and the start-rate counter, as an admin would."""
        self.run("systemctl", "reset-failed", "fastpoetry.service", "fastpoetry.socket", check=False)

    @contextlib.contextmanager
    def drop_in(self, name: str, text: str, unit: str = "fastpoetry.service") -> Iterator[None]:
        """A drop-in for ``unit`` (daemon-reload done); removed again afterwards.

        On the way out the unit is restarted if it runs, so that it runs
        without the drop-in for the next test.
        """
        folder = f"/etc/systemd/system/{unit}.d"
        self.write(f"{folder}/{name}", text.encode())
        self.run("systemctl", "daemon-reload")
        try:
            yield
        finally:
            self.run("rm", "-f", f"{folder}/{name}")
            self.run("rmdir", "--ignore-fail-on-non-empty", folder)
            self.run("systemctl", "daemon-reload")
            self.reset_failed()
            self.run("systemctl", "try-restart", unit)

    # -- clients

    def fetch(self, address: str = "127.0.0.1", port: int = PORT, timeout: float = 60.0) -> bytes:
        """Connect to ``address`` inside and return everything received."""
        return self.python(FETCH, address, str(port), str(timeout)).stdout

    def fetch_later(self, address: str = "127.0.0.1", port: int = PORT, timeout: float = WAIT) -> subprocess.Popen[bytes]:
        """Start a fetch in the background (giving up after ``timeout`` s); its standard output is the poem."""
        return subprocess.Popen(
            self.command("python3", "-c", FETCH, address, str(port), str(timeout)),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=HOST_ENV,
        )

    def processes(self) -> list[dict[str, str]]:
        """Every process inside: pid, name, and real/effective uids."""
        return json.loads(self.python(PROCESSES).stdout)

    def open_fds(self, pid: int) -> int:
        """How many descriptors process ``pid`` inside has open."""
        return len(self.text("ls", f"/proc/{pid}/fd").split())

    def status_of(self, pid: int) -> dict[str, str]:
        """/proc/PID/status inside, as ``{field: value}``."""
        text = self.read(f"/proc/{pid}/status").decode()
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)

    # -- life cycle

    def boot(self, network: Iterable[str] = ("--private-network",)) -> None:
        """Boot the tree; return once systemd says the boot is over.

        ``network`` are systemd-nspawn's network options: by default a
        network namespace with only ``lo``; ``--network-bridge=BRIDGE``
        adds a link ``host0`` to a bridge of the host's (see
        :meth:`use_addresses` and :func:`host_bridge`).
        """
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                "systemd-nspawn", "--quiet", "--directory", str(self.root), "--machine", self.machine,
                "--boot", "--register=no", *self.unit_option(), *network, "--link-journal=no",
            ],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=HOST_ENV,
            start_new_session=True,  # a ^C to pytest must not hit the container first
            preexec_fn=_terminate_with_parent,
        )

        def leader() -> int:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited ({self.process.returncode}):\n{_tail(self.log_path)}")
            return next((pid for pid, name in _children(self.process.pid) if name in ("systemd", "init")), 0)

        self.leader = wait_until(leader, "the container's systemd (PID 1)", timeout=60, interval=0.05)
        self._leader_started = _start_time(self.leader)

        def booted() -> str:
            done = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=WAIT)
            state = done.stdout.decode().strip()
            return state if state in ("running", "degraded", "maintenance", "stopping") else ""

        self.boot_state = wait_until(booted, "the end of the boot", interval=0.2)

    def use_addresses(self, *addresses: str) -> None:
        """Before :meth:`boot`: systemd-networkd gives ``host0`` these addresses (``10.1.2.3/24``).

        Static, nothing else: no DHCP (the file comes before systemd's own
        for containers, which asks for it), no router advertisements, no
        route beyond the addresses' own subnets, and no duplicate address
        detection, so that an IPv6 address is usable at once.
        """
        lines = ["[Match]", "Name=host0", "", "[Network]", "DHCP=no", "IPv6AcceptRA=no", "LLMNR=no", "MulticastDNS=no"]
        for address in addresses:
            lines += ["", "[Address]", f"Address={address}", "DuplicateAddressDetection=none"]
        network = self.root / "etc/systemd/network/10-host0.network"
        network.parent.mkdir(parents=True, exist_ok=True)
        network.write_text("\n".join(lines) + "\n")
        enable = subprocess.run(["chroot", str(self.root), "systemctl", "enable", "systemd-networkd.service"],
                                env=HOST_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        assert enable.returncode == 0, f"enabling systemd-networkd failed:\n{enable.stdout}{enable.stderr}"

    def wait_online(self) -> None:
        """After :meth:`boot` with :meth:`use_addresses`: wait until ``host0`` has them."""

        def online() -> bool:
            return self.run("/usr/lib/systemd/systemd-networkd-wait-online", "--interface=host0:routable",
                            "--timeout=10", check=False, timeout=30).returncode == 0

        wait_until(online, f"{self.machine}'s host0 to be up with its addresses", interval=0.2)

    @staticmethod
    def unit_option() -> list[str]:
        # With systemd as the host's init (and its bus), nspawn asks it for a
        # scope unit of its own, which gives the container's systemd the
        # delegated cgroup it wants.  Without, it cannot, and stays in ours.
        host_systemd = Path("/run/systemd/system").is_dir() and Path("/run/dbus/system_bus_socket").exists()
        return [] if host_systemd else ["--keep-unit"]

    def leader_alive(self) -> bool:
        """Whether the container's systemd (its PID 1) still runs."""
        return bool(self.leader) and self._leader_started is not None and _start_time(self.leader) == self._leader_started

    def unplug(self) -> None:
        """Cut the container's link to the host (``host0``, from ``--network-bridge=``), as a pulled cable.

        The host's end of the veth pair is deleted, which takes the
        container's end with it: from then on nothing it sends or would
        answer gets out, not even a reset.
        """
        peer = int(self.text("cat", "/sys/class/net/host0/iflink"))
        names = [path.parent.name for path in Path("/sys/class/net").glob("*/ifindex")
                 if path.read_text().strip() == str(peer)]
        assert len(names) == 1, f"{self.machine}'s host0 has no peer on the host (ifindex {peer}): {names}"
        _ip("link", "del", names[0])

    def kill(self) -> None:
        """Kill the whole container at once, as a machine dies: SIGKILL to systemd-nspawn and to its PID 1.

        SIGKILL to systemd-nspawn alone leaves the container running,
        orphaned: its PID 1 is not killed with it.  Once its PID 1 is gone,
        the kernel kills every other process in it, and its network
        namespace, with the link to the host, goes with the last of them.
        """
        assert self.process is not None and self.process.poll() is None, "the container is not running"
        os.kill(self.process.pid, signal.SIGKILL)
        if self.leader_alive():
            os.kill(self.leader, signal.SIGKILL)
        self.process.wait(timeout=WAIT)
        wait_until(lambda: not self.leader_alive(), f"the end of {self.machine}'s PID 1 ({self.leader})")

    def destroy(self) -> None:
        """Power off (or kill) the container and remove every trace of it."""
        problems = []
        if self.process is not None and self.process.poll() is not None and self.leader_alive():
            # systemd-nspawn was killed, and the container runs on without it.
            problems.append(f"{self.machine} outlived its systemd-nspawn: killed its PID 1 ({self.leader})")
            os.kill(self.leader, signal.SIGKILL)
            wait_until(lambda: not self.leader_alive(), f"the end of {self.machine}'s PID 1 ({self.leader})")
        if self.process is not None and self.process.poll() is None:
            if self.leader:
                with contextlib.suppress(Exception):
                    self.run("systemctl", "poweroff", "--no-block", check=False, timeout=30)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                problems.append("the container did not power off within 60 s: killed it")
                for pid in (self.leader, self.process.pid):
                    with contextlib.suppress(ProcessLookupError):
                        if pid:
                            os.kill(pid, signal.SIGKILL)
                self.process.wait(timeout=60)
        if self._log is not None:
            self._log.close()
        for path in (PROPAGATE / self.machine, self.directory):
            try:
                remove_tree(path)
            except (OSError, AssertionError, subprocess.CalledProcessError) as exc:
                problems.append(f"cannot remove {path}: {exc}")
        if problems:
            raise AssertionError("; ".join(problems))


def installed_box(config: pytest.Config, suite: str, packages: Iterable[Package], name: str = "fastpoetry",
                  image: Path | None = None) -> Container:
    """A copy of ``suite``'s base image (or of ``image``) with ``packages`` installed, not booted yet.

    The caller boots it and must :meth:`Container.destroy` it.
    """
    RUNS.mkdir(parents=True, exist_ok=True)
    box = Container(RUNS / f"{name}-{os.getpid()}-{secrets.token_hex(3)}")
    box.directory.mkdir()
    try:
        source = image if image is not None else base_image(config, suite)
        subprocess.run(["cp", "-a", str(source), str(box.root)], env=HOST_ENV, check=True)
        scratch = box.root / SCRATCH.lstrip("/")
        scratch.mkdir(parents=True)
        debs = []
        for package in packages:
            shutil.copy(package.path, scratch)
            debs.append(f"{SCRATCH}/{package.path.name}")
        if debs:
            install = subprocess.run(
                ["chroot", str(box.root), "apt-get", "install", "-y", *debs],
                env=HOST_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
            )
            assert install.returncode == 0, f"installing {debs} failed:\n{install.stdout}{install.stderr}"
    except BaseException:
        box.destroy()
        raise
    return box


# ----------------------------------------------------------------------------
# Links between boxes


#: The bridges :func:`host_bridge` makes: the session's PID and a number.
BRIDGE_NAME = re.compile(r"fpbr(\d+)-(\d+)")


def _ip(*argv: str) -> None:
    """Run the host's ``ip`` command; fail with its message."""
    done = subprocess.run(["ip", *argv], env=HOST_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


@contextlib.contextmanager
def host_bridge() -> Iterator[str]:
    """A bridge on the host, up, named ``fpbr<PID>-<N>``: a switch between boxes, nothing more.

    Boxes booted with ``--network-bridge=NAME`` each get a link to it (a
    veth pair that systemd-nspawn makes, and that goes with the box).  The
    host has no address on it, IPv6 is off on it, and nothing is routed or
    forwarded: traffic on it stays between the boxes on it.  Removed
    afterwards; one that a killed session left behind is removed by the
    next.
    """
    links = os.listdir("/sys/class/net")
    for link in links:
        match = BRIDGE_NAME.fullmatch(link)
        if match and int(match.group(1)) != os.getpid() and not Path(f"/proc/{match.group(1)}").exists():
            with contextlib.suppress(AssertionError):
                _ip("link", "del", link)
    number = 0
    while f"fpbr{os.getpid()}-{number}" in links:
        number += 1
    name = f"fpbr{os.getpid()}-{number}"
    _ip("link", "add", name, "type", "bridge")
    try:
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")
        _ip("link", "set", name, "up")
        yield name
    finally:
        _ip("link", "del", name)


# ----------------------------------------------------------------------------
# Scripts run by the container's python3


#: argv: ADDRESS PORT TIMEOUT.  Writes what the server sent to stdout.
FETCH = r"""
import socket, sys
address, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as sock:
    sock.settimeout(timeout)
    sock.connect((address, port))
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
sys.stdout.buffer.write(b"".join(chunks))
"""

#: Prints a JSON list of every process: pid, name, uids (real, effective, saved, fs).
PROCESSES = r"""
import json, os
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":\t", 1) for line in status.read().splitlines() if ":\t" in line)
    except OSError:
        continue
    found.append({"pid": pid, "name": fields["Name"], "uids": fields["Uid"].split()})
print(json.dumps(found))
"""

#: argv: JSON config.  Fetches poems in threads until standard input closes;
#: prints "progress N" every 10 fetches, then a JSON summary.  Each fetch is
#: sorted into one of KINDS, and counted again in the phase it started in: a
#: line "phase NAME" on standard input starts phase NAME (the first is
#: "start").
CLIENT_LOOP = r"""
import hashlib, json, socket, sys, threading, time
config = json.loads(sys.argv[1])
expected = set(config["expected"])
poems = []
for path in config["poem_files"]:
    with open(path, "rb") as file:
        poems.append(file.read())
lock = threading.Lock()
stop = threading.Event()
summary = {"ok": 0, "failed": 0, "empty": 0, "errors": [], "digests": {},
           "kinds": dict.fromkeys(config["kinds"], 0), "phases": {}}
phase = ["start"]

def kind_of(error, data):
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError):
        return "reset"
    if isinstance(error, TimeoutError):
        return "timed out"
    if error is not None:
        return "other error"
    if hashlib.sha256(data).hexdigest() in expected:
        return "whole"
    if not data:
        return "empty"
    return "truncated" if any(poem.startswith(data) for poem in poems) else "foreign"

def fetch(address):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(config["timeout"])
        sock.connect((address, config["port"]))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)

def worker(address):
    while not stop.is_set():
        started_in = phase[0]
        error = digest = None
        data = b""
        try:
            data = fetch(address)
        except OSError as exc:
            kind = kind_of(exc, data)
            error = f"{type(exc).__name__}: {exc}"
        else:
            kind = kind_of(None, data)
            digest = hashlib.sha256(data).hexdigest()
            if digest not in expected:
                error = f"unexpected reply: {len(data)} bytes, sha256 {digest[:16]}"
        with lock:
            summary["kinds"][kind] += 1
            counts = summary["phases"].setdefault(started_in, {"ok": 0, "failed": 0, "kinds": {}, "errors": []})
            counts["kinds"][kind] = counts["kinds"].get(kind, 0) + 1
            counts["ok" if error is None else "failed"] += 1
            if error is not None and len(counts["errors"]) < 5:
                counts["errors"].append(f"{time.strftime('%H:%M:%S')} {address}: {error}")
            if error is None:
                summary["ok"] += 1
                summary["digests"][digest] = summary["digests"].get(digest, 0) + 1
            else:
                summary["failed"] += 1
                if digest is not None and not data:
                    summary["empty"] += 1  # a clean end with not one byte
                if len(summary["errors"]) < 20:
                    summary["errors"].append(f"{time.strftime('%H:%M:%S')} {address}: {error}")
            done = summary["ok"] + summary["failed"]
            if done % 10 == 0:
                print(f"progress {done}", flush=True)
        if error is not None:
            time.sleep(0.01)

threads = [threading.Thread(target=worker, args=(config["addresses"][i % len(config["addresses"])],))
           for i in range(config["threads"])]
for thread in threads:
    thread.start()
while line := sys.stdin.readline():
    if line.startswith("phase "):
        phase[0] = line[6:].strip()
stop.set()
for thread in threads:
    thread.join()
print(json.dumps(summary), flush=True)
"""


#: What a fetch can end with: the whole of an expected poem, nothing at all,
#: the start of a poem, other bytes, or an error.
KINDS = ("whole", "empty", "truncated", "foreign", "refused", "reset", "timed out", "other error")


class ClientLoop:
    """Clients inside the container fetching poems without pause, in threads.

    Every reply must be one of the ``expected`` poems, whole.  Used as a
    context manager; :meth:`stop` ends it and returns the summary:
    ``{"ok": N, "failed": N, "empty": N, "errors": [...], "digests": {sha256: N},
    "kinds": {kind: N}, "phases": {name: {"ok": N, "failed": N, "kinds": {kind: N},
    "errors": [...]}}}``, where ``empty`` counts the failed fetches that
    ended cleanly with no byte, and ``kinds`` sorts every fetch into one of
    :data:`KINDS` (``truncated``: the start of one of ``poem_files``, paths
    inside the container).  ``phases`` counts them again by the phase each
    started in (see :meth:`phase`; the first is ``start``, and a phase in
    which no fetch started is left out).  Each client gives up after
    ``timeout`` seconds.
    """

    def __init__(self, container: Container, expected: Iterable[bytes], threads: int = 1,
                 addresses: tuple[str, ...] = ("127.0.0.1", "::1"), timeout: float = 60.0,
                 poem_files: Iterable[str] = (), port: int = PORT) -> None:
        config = {"expected": [sha256(poem) for poem in expected], "threads": threads,
                  "addresses": list(addresses), "port": port, "timeout": timeout,
                  "poem_files": list(poem_files), "kinds": list(KINDS)}
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            container.command("python3", "-c", CLIENT_LOOP, json.dumps(config)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=HOST_ENV,
        )
        #: Fetches finished so far (to the nearest 10).
        self.done = 0
        self.summary: dict[str, Any] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("progress "):
                self.done = int(line.split()[1])
            elif line.startswith("{"):
                self.summary = json.loads(line)

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def wait_for(self, count: int) -> None:
        """Wait until ``count`` fetches have finished."""

        def reached() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the client loop exited ({self.process.returncode}):\n{self._stderr_text()}")
            return self.done >= count

        wait_until(reached, f"{count} fetches (done: {self.done})", interval=0.02)

    def more(self, count: int) -> None:
        """Wait until ``count`` more fetches have finished."""
        self.wait_for(self.done + count)

    def phase(self, name: str) -> None:
        """Start phase ``name``: every fetch that starts from now on counts in it.

        The clients see it a moment after this returns, never before: a
        fetch counted in ``name`` started after the call.
        """
        assert self.process.stdin is not None and "\n" not in name
        self.process.stdin.write(f"phase {name}\n".encode())
        self.process.stdin.flush()

    def stop(self) -> dict[str, Any]:
        """End the loop (each client finishes its fetch) and return the summary."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
            try:
                self.process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"the client loop did not stop within {WAIT:g} s") from None
        self._reader.join(timeout=WAIT)
        if self.summary is None:
            raise AssertionError(f"the client loop gave no summary ({self.process.returncode}):\n{self._stderr_text()}")
        return self.summary

    def __enter__(self) -> ClientLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._stderr.close()


# ----------------------------------------------------------------------------
# The package's service, as the tests in several modules look at it


PACKAGED_POEM = POEMS / "harbour-ledger.txt"
INSTALLED_POEM = "/usr/share/fastpoetry/poems/harbour-ledger.txt"

#: Where each suite's package puts its units: Debian 12's debhelper under
#: /lib, Debian 13's under /usr/lib (/lib is only an alias there, DEP 17).
UNIT_DIRECTORY = {"bookworm": "/lib/systemd/system", "trixie": "/usr/lib/systemd/system"}
UNITS = ("fastpoetry.socket", "fastpoetry.service", "fastpoetry-proxy.socket", "fastpoetry-proxy.service",
         "fastpoetry-tls.socket", "fastpoetry-tls.service")

#: The package's modules, and the file whose change means a new default Python 3.
MODULES = "/usr/lib/python3/dist-packages/fastpoetry"
PYTHON_DEFAULTS = "/usr/share/python3/debian_defaults"


def uid_of(container: Container, user: str) -> str:
    """The user ID of ``user`` inside, as text."""
    entry = container.text("getent", "passwd", user)
    return entry.split(":")[2]


def served_by_fastpoetry(container: Container) -> list[dict[str, str]]:
    """The processes inside that run as the fastpoetry user."""
    uid = uid_of(container, "fastpoetry")
    return [p for p in container.processes() if uid in p["uids"]]


def new_main_pid(container: Container, old: int) -> int:
    """Wait until the service is active again with a main process other than ``old``."""

    def changed() -> int:
        pid = container.main_pid()
        if pid in (0, old) or container.is_active("fastpoetry.service") != "active":
            return 0
        return pid

    return wait_until(changed, f"a new main process of fastpoetry.service (old: {old})")


def started_service(container: Container) -> int:
    """Make sure the service runs (a client starts it); return its main PID."""
    assert container.fetch() == PACKAGED_POEM.read_bytes()
    assert container.is_active("fastpoetry.service") == "active"
    return container.main_pid()


def compiled_modules(container: Container) -> tuple[int, int]:
    """(modules, those with bytecode for the box's python3), in the package's directory."""
    tag = container.text("python3", "-c", "import sys; print(sys.implementation.cache_tag)")
    count = container.text("sh", "-c", f'ls "$1"/*.py | wc -l; ls "$1"/__pycache__/*.{tag}.pyc 2>/dev/null | wc -l',
                           "sh", MODULES)
    modules, compiled = map(int, count.split())
    return modules, compiled


def journal_cursor(container: Container) -> str:
    """The cursor of the newest journal entry, to read only what comes after."""
    return json.loads(container.text("journalctl", "--no-pager", "-o", "json", "-n", "1"))["__CURSOR"]

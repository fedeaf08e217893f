"""The signed apt repository tools/build-repo makes, used by apt as an administrator would.

tools/build-repo runs on the host.  Its repository is published into a
booted box of each suite and served there by a web server on the box's
loopback (python3's http.server), so apt fetches it over HTTP exactly as
from any static web server.  The box has no other network: apt's other
source, Debian's mirror, fails to answer and apt keeps the lists the base
image came with, as it does on any machine whose mirror is down.

The box tests share one box per suite and run in file order: two tampered
repositories are refused on a box without the package, the README's three
commands install it, apt-get upgrade brings a newer version under load,
and apt-get purge removes it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import (
    HOST_ENV,
    PACKAGED_POEM,
    REPO,
    SCRATCH,
    SUITES,
    WAIT,
    Builder,
    ClientLoop,
    Container,
    Package,
    installed_box,
    repack,
    say,
    wait_until,
)

pytestmark = pytest.mark.system

BUILD_REPO = REPO / "tools/build-repo"
KEYRING = "fastpoetry-archive-keyring.gpg"
SOURCES = "fastpoetry.sources"

#: Where the box publishes the repository (a folder of the box's tree,
#: written from the host) and where its web server serves it.
PUBLISHED = "/srv/apt/fastpoetry"
URL = "http://127.0.0.1:8080/"
#: The folder in the box that the administrator copied the keyring and
#: the sources entry to, and runs the README's commands in.
DOWNLOADS = "/root/fastpoetry-apt"
#: What the package owns in the box, apart from what an administrator made.
ADMIN_FILES = (f"/etc/apt/keyrings/{KEYRING}", f"/etc/apt/sources.list.d/{SOURCES}")


# ----------------------------------------------------------------------------
# Keys and repositories on the host


def gpg(home: Path, *argv: str, input: bytes | None = None) -> bytes:
    done = subprocess.run(["gpg", "--batch", "--quiet", "--homedir", str(home), *argv], input=input,
                          env=HOST_ENV, capture_output=True, timeout=WAIT)
    assert done.returncode == 0, f"gpg {' '.join(argv)}: {done.stderr.decode(errors='replace')}"
    return done.stdout


@dataclass(frozen=True)
class Key:
    """An ASCII-armored secret key in a file, and its fingerprint."""

    path: Path
    fingerprint: str


def make_key(folder: Path, name: str, passphrase: str = "") -> Key:
    """A new ed25519 signing key, as an administrator would make one for build-repo."""
    home = folder / f"gnupg-{name}"
    home.mkdir(mode=0o700, parents=True)
    try:
        gpg(home, "--pinentry-mode", "loopback", "--passphrase", passphrase, "--quick-gen-key",
            f"fastpoetry test {name}", "ed25519", "sign", "1d")
        listing = gpg(home, "--with-colons", "--list-secret-keys").decode()
        fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        path = folder / f"{name}.asc"
        path.write_bytes(gpg(home, "--pinentry-mode", "loopback", "--passphrase", passphrase, "--armor",
                             "--export-secret-keys", fingerprint))
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], env=HOST_ENV, check=False)
        shutil.rmtree(home, ignore_errors=True)
    return Key(path, fingerprint)


def build_repo(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(BUILD_REPO), *map(str, argv)], env=HOST_ENV, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=3600)
    if check:
        assert done.returncode == 0, f"tools/build-repo exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


def debs_folder(folder: Path, packages: dict[str, list[Package]]) -> Path:
    """``folder/SUITE/*.deb``, as --debs wants it."""
    for suite, built in packages.items():
        (folder / suite).mkdir(parents=True, exist_ok=True)
        for package in built:
            shutil.copy(package.path, folder / suite / package.path.name)
    return folder


def indexed(repository: Path, suite: str) -> dict[str, str]:
    """{Filename: Version} of the suite's index."""
    text = (repository / f"dists/{suite}/main/binary-all/Packages").read_text()
    stanzas = [dict(re.findall(r"^(\S+): (.*)$", stanza, re.M)) for stanza in text.strip().split("\n\n")]
    return {stanza["Filename"]: stanza["Version"] for stanza in stanzas}


def verify_signatures(repository: Path, suite: str, fingerprint: str | None = None) -> None:
    """InRelease and Release.gpg verify against the published keyring (with the given fingerprint),
    and every index file has the size and SHA256 the signed Release gives it."""
    keyring = repository / KEYRING
    release = repository / f"dists/{suite}"
    for argv in (["gpgv", "--keyring", str(keyring), str(release / "InRelease")],
                 ["gpgv", "--keyring", str(keyring), str(release / "Release.gpg"), str(release / "Release")]):
        done = subprocess.run(["gpgv", "--status-fd", "1", *argv[1:]], env=HOST_ENV, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
        if fingerprint:
            assert f"VALIDSIG {fingerprint}" in done.stdout, done.stdout
    text = (release / "Release").read_text()
    fields = dict(re.findall(r"^(\S+): (.*)$", text, re.M))
    assert (fields["Suite"], fields["Codename"], fields["Architectures"], fields["Components"]) == (
        suite, suite, "all", "main")
    sha256 = text.split("\nSHA256:\n", 1)[1]
    listed = re.findall(r"^ ([0-9a-f]{64})\s+(\d+) (\S+)$", sha256, re.M)
    assert {name for _, _, name in listed} >= {f"main/binary-all/Packages{ext}" for ext in ("", ".gz", ".xz")}
    for digest, size, name in listed:
        data = (release / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (digest, int(size)), name


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA256 of its contents."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="session")
def signing_key(system_host: None, tmp_path_factory: pytest.TempPathFactory) -> Key:
    return make_key(tmp_path_factory.mktemp("keys"), "archive key")


@pytest.fixture(scope="session")
def packages(builder: Builder) -> dict[str, list[Package]]:
    """Each suite's package, as tools/build-deb built it in a fresh root of that suite."""
    return {suite: [builder.package(suite)] for suite in SUITES}


@pytest.fixture(scope="session")
def repository(packages: dict[str, list[Package]], signing_key: Key, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository of both suites' packages, signed with the test's key."""
    folder = tmp_path_factory.mktemp("repository")
    build_repo("--key", signing_key.path, "--debs", debs_folder(folder / "debs", packages), folder / "out")
    return folder / "out"


@dataclass(frozen=True)
class SelfBuilt:
    """tools/build-repo's run without --debs and --key: its output and what it printed."""

    out: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def self_built(request: pytest.FixtureRequest, system_host: None, tmp_path_factory: pytest.TempPathFactory) -> SelfBuilt:
    out = tmp_path_factory.mktemp("self-built") / "out"
    say(request.config, "tools/build-repo without --debs or --key: builds both packages in fresh roots (minutes)")
    done = build_repo(out)
    return SelfBuilt(out, done.stdout, done.stderr)


# ----------------------------------------------------------------------------
# tools/build-repo itself


def test_build_repo_builds_both_releases_itself_and_warns_of_a_throwaway_key(self_built: SelfBuilt) -> None:
    """Without --debs each release's package is built in a fresh root of it; without --key
    the repository is signed all the same, and the warning says the key is throwaway."""
    assert self_built.stderr.count("THROWAWAY") == 2, self_built.stderr  # at the start and at the end
    for suite, release in SUITES.items():
        files = indexed(self_built.out, suite)
        assert len(files) == 1, files
        (filename, version), = files.items()
        assert version.endswith(f"+deb{release}"), version
        assert filename == f"pool/main/f/fastpoetry/fastpoetry_{version}_all.deb"
        fields = subprocess.run(["dpkg-deb", "--field", str(self_built.out / filename), "Version"], env=HOST_ENV,
                                capture_output=True, text=True, check=True).stdout.strip()
        assert fields == version
        verify_signatures(self_built.out, suite)
        # tools/build-deb ran in the root, lintian and all, and said so.
        assert f"[{suite}] built /build/out/fastpoetry_{version}_all.deb" in self_built.stdout, self_built.stdout
    sources = (self_built.out / SOURCES).read_text()
    assert f"Signed-By: /etc/apt/keyrings/{KEYRING}" in sources
    assert re.search(r"^URIs: https://\S+\.invalid/$", sources, re.M), sources


def tiny_deb(folder: Path, version: str, architecture: str = "all", description: str = "a test package") -> Path:
    """A minimal fastpoetry .deb in ``folder``, with only a control file."""
    tree = folder / f"tree-{version}-{architecture}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: fastpoetry\nVersion: {version}\nArchitecture: {architecture}\n"
        f"Maintainer: fastpoetry tests <tests@fastpoetry.invalid>\nDescription: {description}\n")
    package = "fastpoetry"
    deb = folder / f"{package}_{version}_{architecture}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], env=HOST_ENV, check=True,
                   capture_output=True)
    return deb


def test_build_repo_refuses_bad_input_with_one_line_and_loses_nothing(
    system_host: None, signing_key: Key, tmp_path: Path
) -> None:
    """Each mistake is one line and exit status 1 (2 for usage), and the repository already
    published in OUTDIR is left exactly as it was, with nothing beside it."""
    good = tmp_path / "good"
    for suite, release in SUITES.items():
        (good / suite).mkdir(parents=True)
        shutil.copy(tiny_deb(tmp_path, f"1.0+deb{release}"), good / suite)
    site = tmp_path / "site"
    out = site / "repo"
    build_repo("--key", signing_key.path, "--debs", good, out)
    published = tree_digest(out)

    def variant(name: str, suite: str, deb: Path) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        shutil.copy(deb, folder / suite)
        return folder

    protected = make_key(tmp_path, "protected", passphrase="secret")
    public_only = tmp_path / "public.asc"
    home = tmp_path / "gnupg-public"
    home.mkdir(mode=0o700)
    gpg(home, "--import", str(signing_key.path))
    public_only.write_bytes(gpg(home, "--armor", "--export", signing_key.fingerprint))
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], env=HOST_ENV, check=False)
    not_a_deb = tmp_path / "not-a-deb"
    (not_a_deb / "bookworm").mkdir(parents=True)
    (not_a_deb / "trixie").mkdir()
    (not_a_deb / "bookworm/fastpoetry_1.0_all.deb").write_text("not a package\n")
    (not_a_deb / "trixie/fastpoetry_1.0_all.deb").write_text("not a package\n")
    clash = variant("clash", "bookworm", tiny_deb(tmp_path / "a", "1.5", description="one"))
    shutil.copy(tiny_deb(tmp_path / "b", "1.5", description="another"), clash / "trixie")
    empty = tmp_path / "empty"
    (empty / "bookworm").mkdir(parents=True)
    (empty / "trixie").mkdir()
    cases = {
        "a release's package in the other's folder": (
            ["--key", signing_key.path, "--debs", variant("swapped", "bookworm", tiny_deb(tmp_path, "2.0+deb13"))],
            1, "is a Debian 13 build, in the folder of bookworm"),
        "an architecture-specific package": (
            ["--key", signing_key.path, "--debs", variant("amd64", "trixie", tiny_deb(tmp_path, "2.0", "amd64"))],
            1, "Architecture: amd64"),
        "a file that is not a package": (["--key", signing_key.path, "--debs", not_a_deb], 1, "not a Debian package"),
        "one version with two contents": (["--key", signing_key.path, "--debs", clash], 1, "different contents"),
        "a suite with no package": (["--key", signing_key.path, "--debs", empty], 1, "has no .deb"),
        "a key with a passphrase": (["--key", protected.path, "--debs", good], 1, "without a passphrase"),
        "a public key only": (["--key", public_only, "--debs", good], 1, "holds 0 secret keys"),
        "a key file that is not a key": (["--key", good / "bookworm" / "fastpoetry_1.0+deb12_all.deb", "--debs", good],
                                         1, "gpg cannot import it"),
        "an unknown option": (["--keys", signing_key.path], 2, "unknown option: --keys"),
    }
    for what, (argv, status, message) in cases.items():
        done = build_repo(*argv, out, check=False)
        errors = done.stderr.strip().splitlines()
        assert done.returncode == status, f"{what}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        assert message in errors[0], f"{what}: {errors}"
        if status == 1:
            assert len(errors) == 1, f"{what}: more than one line: {errors}"
        assert tree_digest(out) == published, f"{what}: the published repository changed"
        assert sorted(p.name for p in site.iterdir()) == ["repo"], f"{what}: left {list(site.iterdir())}"
    # A folder that is not a repository is never replaced.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine\n")
    done = build_repo("--key", signing_key.path, "--debs", good, precious, check=False)
    assert done.returncode == 1 and "is not a repository made by build-repo" in done.stderr, done.stderr
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------
# apt in booted boxes


class Box:
    """A booted box of one suite without the package, with a web server for the repository."""

    def __init__(self, container: Container, suite: str) -> None:
        self.container = container
        self.suite = suite
        self.published = container.root / PUBLISHED.lstrip("/")

    def publish(self, repository: Path) -> None:
        """Put ``repository`` where the web server serves it, replacing what was there."""
        if self.published.exists():
            shutil.rmtree(self.published)
        shutil.copytree(repository, self.published)

    def configure(self) -> None:
        """The README's first two commands: the keyring and the sources entry."""
        self.container.run("mkdir", "-p", DOWNLOADS)
        for name in (KEYRING, SOURCES):
            self.container.run("cp", f"{PUBLISHED}/{name}", f"{DOWNLOADS}/{name}")
        self.readme(readme_commands()[:2])

    def readme(self, commands: list[str], timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        script = f"set -e\nURL={URL}\ncd {DOWNLOADS}\n" + "\n".join(commands)
        return self.container.run("sh", "-c", script, timeout=timeout)

    def apt(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self.container.run("apt-get", *argv, check=check, timeout=600)

    def installed(self) -> str:
        """The installed version of fastpoetry, or ''."""
        done = self.container.run("dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", "fastpoetry", check=False)
        text = done.stdout.decode().split()
        return text[1] if done.returncode == 0 and text and text[0] == "ii" else ""

    def forget(self) -> None:
        """No fastpoetry, no repository configuration, no lists from it: a box that never saw it."""
        if self.installed():
            self.apt("purge", "-y", "fastpoetry")
        self.container.run("rm", "-f", *ADMIN_FILES)
        self.container.run("sh", "-c", "rm -f /var/lib/apt/lists/127.0.0.1_*")


def readme_commands() -> list[str]:
    """The three commands of the README's "Install from the repository"."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Install from the repository"):]
    section = section[: section.index("\n#", 1)]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, f"no commands in:\n{section}"
    commands = [line.strip() for line in block.group(1).strip().splitlines()]
    assert len(commands) == 3, commands
    return commands


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest, suite: str, repository: Path) -> Iterator[Box]:
    container = installed_box(request.config, suite, [], name="repository")
    try:
        say(request.config, f"booting {container.root} (no package; the repository served on its loopback)")
        container.boot()
        served = Box(container, suite)
        served.publish(repository)
        container.run("systemd-run", "--unit=apt-repository", "--", "python3", "-m", "http.server",
                      "--bind", "127.0.0.1", "--directory", PUBLISHED, "8080")
        fetch = f"import urllib.request; urllib.request.urlopen('{URL}{SOURCES}', timeout=5).read()"
        wait_until(lambda: container.run("python3", "-c", fetch, check=False).returncode == 0,
                   "the box's web server")
        yield served
    finally:
        container.destroy()


def assert_refused(box: Box, update: subprocess.CompletedProcess[bytes], why: str) -> None:
    """apt-get update failed for the repository, for ``why``, and nothing can be installed from it."""
    output = (update.stdout + update.stderr).decode(errors="replace")
    assert update.returncode != 0, f"apt-get update accepted the repository:\n{output}"
    errors = [line for line in output.splitlines() if line.startswith("E:")]
    assert any(URL.rstrip("/") in line for line in errors), f"no error names {URL}:\n{output}"
    assert re.search(why, output), f"apt-get update did not say {why!r}:\n{output}"
    install = box.apt("install", "-y", "fastpoetry", check=False)
    assert install.returncode != 0, install.stdout.decode(errors="replace")
    assert box.installed() == ""
    assert box.container.run("test", "-e", "/usr/bin/fastpoetry", check=False).returncode != 0
    assert box.container.text("getent", "passwd", "fastpoetry", check=False) == ""


def test_a_tampered_index_is_refused_and_nothing_installed(
    box: Box, repository: Path, packages: dict[str, list[Package]], tmp_path: Path
) -> None:
    """A pool with another package and a Packages file rewritten to match it, under the old
    signed Release: apt sees the index is not the one signed, and installs nothing."""
    box.forget()
    tampered = tmp_path / "tampered"
    shutil.copytree(repository, tampered)
    evil = repack(packages[box.suite][0], tmp_path, "9.9.9")
    pool = tampered / "pool/main/f/fastpoetry"
    shutil.copy(evil.path, pool)
    index = tampered / f"dists/{box.suite}/main/binary-all"
    stanza = subprocess.run(["apt-ftparchive", "packages", f"pool/main/f/fastpoetry/{evil.path.name}"], cwd=tampered,
                            env=HOST_ENV, capture_output=True, text=True, check=True).stdout
    (index / "Packages").write_text((index / "Packages").read_text().rstrip("\n") + "\n\n" + stanza)
    for compress, ext in (("gzip", ".gz"), ("xz", ".xz")):
        (index / f"Packages{ext}").write_bytes(subprocess.run(
            [compress, "-c", str(index / "Packages")], env=HOST_ENV, capture_output=True, check=True).stdout)
    box.publish(tampered)
    box.configure()
    assert_refused(box, box.apt("update", check=False), r"Hash Sum mismatch|File has unexpected size")


def test_a_repository_signed_by_another_key_is_refused_and_nothing_installed(
    box: Box, self_built: SelfBuilt, repository: Path
) -> None:
    """A whole repository, correct in itself, signed by a key other than the one the
    administrator trusts: apt refuses it and installs nothing."""
    box.forget()
    box.publish(repository)
    box.configure()  # the trusted keyring
    other = self_built.out  # the same packages' builds, signed by build-repo's throwaway key
    box.publish(other)
    assert_refused(box, box.apt("update", check=False), r"NO_PUBKEY|not signed|[Mm]issing key")


def test_readme_commands_install_from_the_repository(box: Box, repository: Path, packages: dict[str, list[Package]]) -> None:
    """The README's three commands: fastpoetry from the repository, its socket enabled and
    listening, the exact poem served by a process running as fastpoetry."""
    box.forget()
    box.publish(repository)
    box.container.run("mkdir", "-p", DOWNLOADS)
    for name in (KEYRING, SOURCES):  # what the administrator downloaded
        box.container.run("cp", f"{PUBLISHED}/{name}", f"{DOWNLOADS}/{name}")
    done = box.readme(readme_commands())
    assert box.installed() == packages[box.suite][0].version, done.stdout.decode(errors="replace")
    sources = box.container.read(f"/etc/apt/sources.list.d/{SOURCES}").decode()
    assert f"URIs: {URL}\n" in sources and f"Suites: {box.suite}\n" in sources, sources
    policy = box.container.text("apt-cache", "policy", "fastpoetry")
    assert f"{URL.rstrip('/')} {box.suite}/main all Packages" in policy, policy
    container = box.container
    assert container.text("systemctl", "is-enabled", "fastpoetry.socket") == "enabled"
    assert container.is_active("fastpoetry.socket") == "active"
    assert container.fetch() == PACKAGED_POEM.read_bytes()
    pid = container.main_pid()
    assert pid and container.status_of(pid)["Uid"].split()[0] == container.text("id", "-u", "fastpoetry")


def test_apt_upgrade_brings_a_newer_version_under_load(
    box: Box, packages: dict[str, list[Package]], signing_key: Key, tmp_path: Path
) -> None:
    """A newer version published to the repository reaches the box through apt-get upgrade
    while clients fetch without pause: no fetch fails, the socket is never restarted, and the
    next server is the new code."""
    container = box.container
    current = packages[box.suite][0]
    assert box.installed() == current.version, "the previous test installs the package"
    newer = repack(current, tmp_path, f"{current.version}u1")  # a stable update's version
    published = {**packages, box.suite: [current, newer]}
    build_repo("--key", signing_key.path, "--debs", debs_folder(tmp_path / "debs", published), box.published)
    assert container.fetch() == PACKAGED_POEM.read_bytes()
    socket_before = {p: container.show("fastpoetry.socket", p) for p in ("ActiveEnterTimestamp", "InvocationID")}
    with ClientLoop(container, [PACKAGED_POEM.read_bytes()], threads=2) as loop:
        loop.more(200)
        update = box.apt("update")
        output = (update.stdout + update.stderr).decode(errors="replace")
        assert not [line for line in output.splitlines() if URL.rstrip("/") in line and line.startswith(("E:", "W:"))], output
        box.apt("upgrade", "-y")
        loop.more(200)
        summary = loop.stop()
    total = summary["ok"] + summary["failed"]
    assert summary["failed"] == 0, f"{summary['failed']} of {total} fetches failed during the upgrade: {summary['errors']}"
    assert box.installed() == newer.version
    assert {p: container.show("fastpoetry.socket", p) for p in socket_before} == socket_before, \
        "fastpoetry.socket was restarted by the upgrade"
    assert container.fetch() == PACKAGED_POEM.read_bytes()
    pid = container.main_pid()
    assert f"fastpoetry {newer.version} starting" in container.journal(f"_PID={pid}"), container.journal(f"_PID={pid}")


def test_purge_removes_the_package_and_leaves_the_repository_configuration(box: Box) -> None:
    """apt-get purge removes what the package made; the keyring and the sources entry are
    the administrator's, and the repository still works after."""
    container = box.container
    assert box.installed(), "the previous tests install the package"
    admin = {path: container.read(path) for path in ADMIN_FILES}
    box.apt("purge", "-y", "fastpoetry")
    assert container.run("dpkg", "-s", "fastpoetry", check=False).returncode != 0
    assert container.text("systemctl", "list-unit-files", "--no-legend", "fastpoetry*", check=False) == ""
    assert container.is_active("fastpoetry.socket") != "active"
    assert container.text("getent", "passwd", "fastpoetry", check=False) == ""
    # Not the package's: the administrator's files, apt's lists and its
    # cache of downloaded packages (apt-get clean empties it), the tests'
    # own folder.
    left = container.text(
        "find", "/etc", "/usr", "/var", "-xdev", "-name", "*fastpoetry*",
        *(arg for path in ADMIN_FILES for arg in ("-not", "-path", path)),
        "-not", "-path", "/var/lib/apt/lists/*", "-not", "-path", "/var/cache/apt/archives/*",
        "-not", "-path", f"{SCRATCH}*",
    )
    assert left == "", f"left behind:\n{left}"
    assert {path: container.read(path) for path in ADMIN_FILES} == admin
    box.apt("update")
    assert "Candidate: (none)" not in container.text("apt-cache", "policy", "fastpoetry")

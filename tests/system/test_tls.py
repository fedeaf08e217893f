"""fastpoetry-tls.socket and fastpoetry-tls.service from the Debian package,
under a real systemd: the poem over TLS on port 10443, its key handed over
as a systemd credential or read by the server itself, and both ways of
rotating the certificate.

A test CA and its server certificates (ECDSA P-256, for ``localhost``,
127.0.0.1 and ::1) are made on the host with the openssl command.  The
clients verify against that CA: the host's ``openssl s_client``, run in the
container's network namespace (the container has no openssl), the
container's own ``python3`` with ``ssl``, and the installed ``fastpoetry
get --tls``.  An upgrade and a remove with the TLS socket enabled show
that the maintainer scripts treat it as they treat the proxy.

The tests share the session's container (see conftest.py), and leave it as
they found it: the TLS socket disabled and stopped, no certificate, key or
drop-in left.  test_system.py ends by purging the package; the
``installed`` fixture installs it again for this module, and purges it
again afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import (
    HOST_ENV,
    PACKAGED_POEM,
    PORT,
    SCRATCH,
    WAIT,
    Container,
    Package,
    journal_cursor,
    repack,
    wait_until,
)

pytestmark = pytest.mark.system

SOCKET = "fastpoetry-tls.socket"
SERVICE = "fastpoetry-tls.service"
TLS_PORT = 10443
CERT = "/etc/fastpoetry/tls.crt"
KEY = "/etc/fastpoetry/tls.key"
#: The drop-in as the package ships it, and where the administrator puts it.
EXAMPLE = "/usr/share/doc/fastpoetry/examples/fastpoetry-tls-credentials.conf"
DROP_IN_FOLDER = f"/etc/systemd/system/{SERVICE}.d"
DROP_IN = f"{DROP_IN_FOLDER}/credentials.conf"
#: Where systemd puts the service's credentials (%d).
CREDENTIALS = f"/run/credentials/{SERVICE}"
#: The test CA's certificate inside the container, for the clients there.
CA_INSIDE = f"{SCRATCH}/tls/ca.crt"

#: The openssl configuration the test CA issues with: a CA certificate and
#: server certificates for this host's loopback, with the extensions strict
#: verifiers want (Python 3.13's default context among them).
OPENSSL_CONFIG = """\
[req]
distinguished_name = name
prompt = no
[name]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

#: argv: ADDRESS PORT CAFILE NAME.  Fetches the poem over TLS, verifying the
#: certificate against CAFILE and for NAME, and reads until the server's
#: close_notify: with suppress_ragged_eofs=False a connection that ends
#: without one raises instead.  Prints JSON: the poem (base64), the TLS
#: version and the SHA-256 of the server certificate (DER).
TLS_FETCH = r"""
import base64, hashlib, json, socket, ssl, sys
address, port, cafile, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=cafile)
family = socket.AF_INET6 if ":" in address else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as plain:
    plain.settimeout(60)
    plain.connect((address, port))
    with context.wrap_socket(plain, server_hostname=name, suppress_ragged_eofs=False) as tls:
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
        print(json.dumps({"poem": base64.b64encode(b"".join(chunks)).decode(), "version": tls.version(),
                          "certificate": hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()}))
"""


# ----------------------------------------------------------------------------
# The test CA, on the host


@dataclass(frozen=True)
class Pair:
    """A server certificate and its key, PEM, and the certificate's SHA-256 (of its DER)."""

    cert: bytes
    key: bytes
    fingerprint: str

    def key_lines(self) -> list[str]:
        """The base64 lines of the key's PEM: any one of them in a log would be a leak."""
        return [line for line in self.key.decode().splitlines() if line and not line.startswith("-----")]


def openssl(*argv: str, cwd: Path) -> None:
    """Run the host's openssl; fail with what it said."""
    done = subprocess.run(["openssl", *argv], cwd=cwd, env=HOST_ENV, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, f"openssl {' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"


class Authority:
    """A throwaway CA in ``directory``, made with the openssl command; it issues server pairs."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        directory.mkdir()
        (directory / "openssl.cnf").write_text(OPENSSL_CONFIG)
        openssl("req", "-x509", "-config", "openssl.cnf", "-extensions", "ca", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                "-days", "2", "-subj", f"/CN={name}", cwd=directory)
        self.cert = directory / "ca.crt"
        self._serial = 1000

    def issue(self) -> Pair:
        """A new key and a certificate for it (localhost, 127.0.0.1, ::1), with a new serial number."""
        self._serial += 1
        stem = f"server-{self._serial}"
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{stem}.key",
                cwd=self.directory)
        openssl("req", "-new", "-config", "openssl.cnf", "-key", f"{stem}.key", "-subj", "/CN=localhost",
                "-out", f"{stem}.csr", cwd=self.directory)
        openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-set_serial", str(self._serial), "-days", "2", "-extfile", "openssl.cnf", "-extensions", "server",
                "-out", f"{stem}.crt", cwd=self.directory)
        cert = (self.directory / f"{stem}.crt").read_bytes()
        fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.decode())).hexdigest()
        return Pair(cert, (self.directory / f"{stem}.key").read_bytes(), fingerprint)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    """The test CA the clients trust."""
    return Authority(tmp_path_factory.mktemp("tls") / "ca", "fastpoetry test CA")


# ----------------------------------------------------------------------------
# The files, the units and the clients, in the container


def put(container: Container, path: str, data: bytes, mode: str, group: str = "root") -> None:
    """Replace ``path`` inside with ``data`` at once (a rename), owned by root:``group``, mode ``mode``.

    The new file is written with umask 077, so the key is never readable by
    anyone else, not even for a moment.
    """
    script = 'umask 077 && cat > "$1.new" && chgrp "$2" "$1.new" && chmod "$3" "$1.new" && mv -f "$1.new" "$1"'
    container.run("sh", "-c", script, "sh", path, group, mode, input=data)


def install_pair(container: Container, pair: Pair, key_group: str = "root") -> None:
    """The certificate as /etc/fastpoetry/tls.crt (0644), the key as tls.key: root:root 0600, or 0640 for ``key_group``."""
    container.run("mkdir", "-p", "/etc/fastpoetry")
    put(container, CERT, pair.cert, "0644")
    put(container, KEY, pair.key, "0600" if key_group == "root" else "0640", key_group)


@contextmanager
def tls_enabled(container: Container, authority: Authority, pair: Pair, credentials: bool) -> Iterator[None]:
    """Certificate and key installed, with the packaged credentials drop-in if ``credentials``
    (the key then root's alone; else readable by group fastpoetry), and
    ``systemctl enable --now fastpoetry-tls.socket``.  Afterwards the socket
    is disabled, both units stopped, and the files and drop-in removed.
    """
    container.write(CA_INSIDE, authority.cert.read_bytes())
    install_pair(container, pair, "root" if credentials else "fastpoetry")
    if credentials:
        container.run("mkdir", "-p", DROP_IN_FOLDER)
        container.run("cp", EXAMPLE, DROP_IN)
    container.run("systemctl", "daemon-reload")
    container.run("systemctl", "reset-failed", SERVICE, SOCKET, check=False)
    try:
        container.run("systemctl", "enable", "--now", SOCKET)
        yield
    finally:
        container.run("systemctl", "disable", "--now", SOCKET, check=False)
        container.run("systemctl", "stop", SERVICE, check=False)
        container.run("systemctl", "reset-failed", SERVICE, SOCKET, check=False)
        container.run("rm", "-rf", DROP_IN_FOLDER, CERT, KEY, f"{SCRATCH}/tls")
        container.run("rmdir", "--ignore-fail-on-non-empty", "/etc/fastpoetry")
        container.run("systemctl", "daemon-reload")


def tls_fetch(container: Container, address: str = "127.0.0.1", name: str = "localhost",
              ca: str = CA_INSIDE) -> dict[str, str]:
    """The container's python3 fetches over TLS, verifying against ``ca`` for ``name``."""
    done = container.python(TLS_FETCH, address, str(TLS_PORT), ca, name, check=False)
    assert done.returncode == 0, f"TLS fetch from {address} failed:\n{done.stderr.decode(errors='replace')}"
    reply = json.loads(done.stdout)
    reply["poem"] = base64.b64decode(reply["poem"])
    return reply


def s_client(container: Container, ca: Path, *options: str) -> subprocess.CompletedProcess[bytes]:
    """The host's ``openssl s_client`` in the container's network, verifying against ``ca``;
    it reads until the server closes (``-ign_eof``), the poem on standard output and a
    summary of the connection (``-brief``) on standard error."""
    return subprocess.run(
        ["nsenter", "-t", str(container.leader), "-n", "openssl", "s_client", "-connect", f"127.0.0.1:{TLS_PORT}",
         "-CAfile", str(ca), "-verify_return_error", "-ign_eof", "-brief", *options],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT, env=HOST_ENV,
    )


#: argv: PORT.  Exits 0 if connections to PORT are refused, on IPv4 and IPv6.
REFUSED = r"""
import socket, sys
port = int(sys.argv[1])
for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    with socket.socket(family) as sock:
        sock.settimeout(10)
        try:
            sock.connect((address, port))
        except ConnectionRefusedError:
            continue
        raise SystemExit(f"{address}:{port} accepted a connection")
"""


def serves(container: Container, pair: Pair) -> None:
    """A new client gets the packaged poem, whole and ended by a close_notify, with ``pair``'s certificate."""
    reply = tls_fetch(container)
    assert reply["poem"] == PACKAGED_POEM.read_bytes()
    assert reply["certificate"] == pair.fingerprint, "the server shows another certificate"


def main_pid(container: Container) -> int:
    """The TLS service's main PID, once it is active."""
    wait_until(lambda: container.is_active(SERVICE) == "active", f"{SERVICE} to be active")
    return container.main_pid(SERVICE)


def reload(container: Container) -> subprocess.CompletedProcess[bytes]:
    """``systemctl reload fastpoetry-tls``, whatever its outcome."""
    return container.run("systemctl", "reload", SERVICE, check=False, timeout=WAIT)


def said(done: subprocess.CompletedProcess[bytes]) -> str:
    return (done.stdout + done.stderr).decode(errors="replace")


def journal_since(container: Container, cursor: str) -> str:
    """The TLS service's messages since ``cursor``."""
    container.run("journalctl", "--sync")
    return container.text("journalctl", "--no-pager", "-o", "cat", "-u", SERVICE, f"--after-cursor={cursor}")


def logs_fingerprint(journal: str, pair: Pair) -> bool:
    """Whether ``journal`` names ``pair``'s SHA-256 fingerprint: in hex, in either case, bare or
    with colons between the bytes (as ``openssl x509 -fingerprint -sha256`` prints it)."""
    bare = pair.fingerprint
    colons = ":".join(bare[i : i + 2] for i in range(0, len(bare), 2))
    return bare in journal.lower() or colons in journal.lower()


def assert_no_key_logged(container: Container, *pairs: Pair) -> None:
    """Not one line of any of the keys anywhere in the journal, in any field, nor in the status."""
    container.run("journalctl", "--sync")
    journal = container.text("journalctl", "--no-pager", "--all", "-o", "verbose")
    status = container.show(SERVICE, "StatusText")
    for pair in pairs:
        for line in pair.key_lines():
            assert line not in journal, "a line of the private key is in the journal"
            assert line not in status, "a line of the private key is in the service's status"


# ----------------------------------------------------------------------------
# The tests


def test_tls_units_are_installed_but_not_enabled_and_verify_clean(installed: Container) -> None:
    """The package installs fastpoetry-tls.socket and .service without enabling or starting
    them, and the credentials drop-in as an example; the units verify clean, with the drop-in
    too, and systemd-analyze security rates the service at most 1.0.
    """
    container = installed
    for unit in (SOCKET, SERVICE):
        assert container.show(unit, "LoadState") == "loaded", unit
        assert container.is_active(unit) == "inactive", unit
    assert container.text("systemctl", "is-enabled", SOCKET, check=False) == "disabled"
    assert container.text("systemctl", "is-enabled", SERVICE, check=False) == "static"
    assert container.show(SOCKET, "Listen") == f"[::]:{TLS_PORT} (Stream)"
    assert EXAMPLE in container.text("dpkg", "-L", "fastpoetry").splitlines()
    units = [container.show(unit, "FragmentPath") for unit in (SOCKET, SERVICE)]
    try:
        for drop_in in (False, True):
            if drop_in:
                container.run("mkdir", "-p", DROP_IN_FOLDER)
                container.run("cp", EXAMPLE, DROP_IN)
                container.run("systemctl", "daemon-reload")
                assert container.show(SERVICE, "DropInPaths") == DROP_IN
            done = container.run("systemd-analyze", "verify", *units, check=False)
            assert (done.returncode, said(done)) == (0, ""), said(done)
            security = container.text("systemd-analyze", "security", "--no-pager", SERVICE)
            match = re.search(rf"Overall exposure level for {re.escape(SERVICE)}: (\d+(?:\.\d+)?)", security)
            assert match, security
            assert float(match.group(1)) <= 1.0, security
    finally:
        container.run("rm", "-rf", DROP_IN_FOLDER)
        container.run("systemctl", "daemon-reload")


def test_with_credentials_the_key_stays_root_only_and_rotation_takes_a_restart(
    installed: Container, authority: Authority, tmp_path: Path
) -> None:
    """With the packaged credentials drop-in, the key root:root 0600 and the socket enabled:
    openssl s_client (TLS 1.3 and 1.2), Python's ssl and ``fastpoetry get --tls`` fetch the
    exact poem and verify the certificate against the test CA, while the fastpoetry user
    cannot read the key.  New files and a reload change nothing (systemd copied the
    credentials at the start); a restart serves the new certificate.  The plain port is
    untouched, and no line of a key is ever in the journal.
    """
    container = installed
    first, second = authority.issue(), authority.issue()
    poem = PACKAGED_POEM.read_bytes()
    with tls_enabled(container, authority, first, credentials=True):
        assert container.text("systemctl", "is-enabled", SOCKET) == "enabled"
        assert container.is_active(SOCKET) == "active"
        # Socket-activated: nothing runs before the first client.
        assert container.is_active(SERVICE) == "inactive"

        # openssl s_client, the host's, verifying against the test CA.
        for version in ("-tls1_3", "-tls1_2"):
            done = s_client(container, authority.cert, version, "-verify_hostname", "localhost",
                            "-servername", "localhost")
            summary = done.stderr.decode(errors="replace")
            assert done.returncode == 0, summary
            assert done.stdout == poem, summary
            assert "Verification: OK" in summary and "Verified peername: localhost" in summary, summary
            assert f"Protocol version: TLSv1.{version[-1]}" in summary, summary
        # Python's ssl, on both loopback addresses, by name and by address.
        for address, name in (("127.0.0.1", "localhost"), ("::1", "localhost"), ("127.0.0.1", "127.0.0.1"),
                              ("::1", "::1")):
            reply = tls_fetch(container, address, name)
            assert reply["poem"] == poem and reply["certificate"] == first.fingerprint, (address, name)
            assert reply["version"] == "TLSv1.3"
        # The package's own client; with another CA it refuses the server.
        done = container.run("fastpoetry", "get", "--tls", "--ca", CA_INSIDE, f"127.0.0.1:{TLS_PORT}",
                             f"[::1]:{TLS_PORT}")
        assert done.stdout == poem + poem, said(done)
        stranger = Authority(tmp_path / "other-ca", "another CA")
        container.write(f"{SCRATCH}/tls/other-ca.crt", stranger.cert.read_bytes())
        refused = container.run("fastpoetry", "get", "--tls", "--ca", f"{SCRATCH}/tls/other-ca.crt",
                                f"127.0.0.1:{TLS_PORT}", check=False)
        assert refused.returncode == 1 and refused.stdout == b"", said(refused)

        # The server got the key from systemd: its command line names the
        # copies (%d, expanded in Environment= too), which are the files of /etc.
        pid = main_pid(container)
        argv = container.read(f"/proc/{pid}/cmdline").split(b"\0")
        assert argv[-5:-1] == [b"--tls-cert", f"{CREDENTIALS}/tls.crt".encode(),
                               b"--tls-key", f"{CREDENTIALS}/tls.key".encode()], argv
        assert container.read(f"/proc/{pid}/root{CREDENTIALS}/tls.key") == first.key
        # The key on disk is root's alone, and the user the server runs as
        # cannot read it, while the server serves.
        assert container.text("stat", "-c", "%U:%G %a", KEY) == "root:root 600"
        assert container.text("stat", "-c", "%U", f"/proc/{pid}") == "fastpoetry"
        denied = container.run("setpriv", "--reuid=fastpoetry", "--regid=fastpoetry", "--init-groups",
                               "cat", KEY, check=False)
        assert denied.returncode != 0 and denied.stdout == b"", said(denied)
        assert "Permission denied" in said(denied), said(denied)
        serves(container, first)
        # Port 10000 stays plain TCP.
        assert container.fetch(port=PORT) == poem

        # Rotation, first the wrong way: new files and a reload.  The reload
        # succeeds, but it reads the copies systemd made at the start.
        cursor = journal_cursor(container)
        install_pair(container, second)
        done = reload(container)
        assert done.returncode == 0, said(done)
        assert container.read(f"/proc/{pid}/root{CREDENTIALS}/tls.crt") == first.cert
        serves(container, first)
        assert main_pid(container) == pid
        # Then the right way: a restart, and systemd copies the new files.
        container.run("systemctl", "restart", SERVICE)
        new = main_pid(container)
        assert new != pid
        serves(container, second)
        assert container.read(f"/proc/{new}/root{CREDENTIALS}/tls.crt") == second.cert
        journal = journal_since(container, cursor)
        assert logs_fingerprint(journal, second), f"the new certificate's fingerprint is not logged:\n{journal}"
        assert_no_key_logged(container, first, second)
    assert container.is_active(SOCKET) == "inactive" and container.is_active(SERVICE) == "inactive"
    assert container.text("systemctl", "is-enabled", SOCKET, check=False) == "disabled"
    assert container.fetch(port=PORT) == poem


def test_without_credentials_a_reload_rotates_and_a_bad_pair_keeps_the_old(
    installed: Container, authority: Authority
) -> None:
    """Without the drop-in the server reads /etc/fastpoetry/tls.key itself (root:fastpoetry
    0640).  New files and ``systemctl reload`` serve the new certificate to new clients, from
    the same process; a certificate that does not match the key makes the reload fail, and
    the old pair is served on.  No line of a key is ever in the journal.
    """
    container = installed
    first, second, third = authority.issue(), authority.issue(), authority.issue()
    with tls_enabled(container, authority, first, credentials=False):
        assert container.text("stat", "-c", "%U:%G %a", KEY) == "root:fastpoetry 640"
        serves(container, first)
        pid = main_pid(container)
        argv = container.read(f"/proc/{pid}/cmdline").split(b"\0")
        assert argv[-5:-1] == [b"--tls-cert", CERT.encode(), b"--tls-key", KEY.encode()], argv
        invocation = container.show(SERVICE, "InvocationID")

        # Rotation by reload: the new pair, at once, without a restart.
        cursor = journal_cursor(container)
        install_pair(container, second, "fastpoetry")
        done = reload(container)
        assert done.returncode == 0, said(done)
        serves(container, second)
        assert (main_pid(container), container.show(SERVICE, "InvocationID")) == (pid, invocation)
        journal = journal_since(container, cursor)
        assert logs_fingerprint(journal, second), f"the new certificate's fingerprint is not logged:\n{journal}"

        # A bad pair: the third certificate with the second's key.  The
        # reload fails, says why, and the second pair is served on.
        cursor = journal_cursor(container)
        put(container, CERT, third.cert, "0644")
        done = reload(container)
        assert done.returncode != 0, said(done)
        journal = journal_since(container, cursor)
        assert "reload failed" in journal, journal
        assert "; last reload failed: " in container.show(SERVICE, "StatusText")
        serves(container, second)
        assert container.is_active(SERVICE) == "active"
        assert (main_pid(container), container.show(SERVICE, "InvocationID")) == (pid, invocation)

        # The matching key arrives: the next reload serves the third pair.
        put(container, KEY, third.key, "0640", "fastpoetry")
        done = reload(container)
        assert done.returncode == 0, said(done)
        serves(container, third)
        assert main_pid(container) == pid
        assert "reload failed" not in container.show(SERVICE, "StatusText")
        assert_no_key_logged(container, first, second, third)
    assert container.is_active(SOCKET) == "inactive" and container.is_active(SERVICE) == "inactive"
    assert container.run("test", "-e", KEY, check=False).returncode != 0


def test_upgrade_keeps_an_enabled_tls_socket_and_remove_stops_it(
    installed: Container, package: Package, authority: Authority, tmp_path: Path
) -> None:
    """With the TLS socket enabled and the credentials drop-in: an upgrade does not restart
    the socket, keeps it enabled, and moves the server to the new code, which serves with
    the credentials; ``apt-get remove`` stops both units, and installing again brings the
    socket back, enabled and listening (the maintainer scripts treat it as the proxy).
    """
    container = installed
    pair = authority.issue()
    # Newer than what is installed, and than test_system.py's upgrades.
    upgrade = repack(package, tmp_path, f"{package.version}+tls1")
    deb = f"{SCRATCH}/{upgrade.path.name}"
    container.write(deb, upgrade.path.read_bytes())
    with tls_enabled(container, authority, pair, credentials=True):
        serves(container, pair)
        old = main_pid(container)
        socket_before = {p: container.show(SOCKET, p) for p in ("ActiveEnterTimestamp", "InvocationID")}
        container.run("apt-get", "install", "-y", deb, timeout=600)
        assert container.text("dpkg-query", "-W", "-f", "${Version}", "fastpoetry") == upgrade.version
        assert {p: container.show(SOCKET, p) for p in socket_before} == socket_before, f"{SOCKET} was restarted"
        assert container.text("systemctl", "is-enabled", SOCKET) == "enabled"
        new = main_pid(container)
        assert new != old, "the upgrade did not restart the TLS service"
        assert f"fastpoetry {upgrade.version} starting" in container.journal(f"_PID={new}")
        serves(container, pair)
        assert container.read(f"/proc/{new}/root{CREDENTIALS}/tls.crt") == pair.cert

        try:
            container.run("apt-get", "remove", "-y", "fastpoetry", timeout=600)
            assert container.is_active(SOCKET) != "active" and container.is_active(SERVICE) != "active"
            refused = container.python(REFUSED, str(TLS_PORT), check=False)
            assert refused.returncode == 0, refused.stderr.decode(errors="replace")
        finally:
            container.run("apt-get", "install", "-y", deb, timeout=600)
        assert container.text("systemctl", "is-enabled", SOCKET) == "enabled"
        assert container.is_active(SOCKET) == "active"
        serves(container, pair)

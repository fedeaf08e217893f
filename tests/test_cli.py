"""The ``fastpoetry`` command line, run as a real process.

Usage errors exit 2, runtime errors 1, each with one line that says what is
wrong and never a traceback; a runtime error is also given to systemd as
``STATUS=Failed to start: ...``.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import fastpoetry
from helpers import (
    DEFAULT_POEM,
    POEMS,
    WAIT,
    NoLocalhost,
    NotifySocket,
    Server,
    clean_env,
    fetch,
    listening_socket,
    make_pair,
    start_activated,
    terminate,
)

PYTHON_M = [sys.executable, "-m", "fastpoetry"]
SCRIPT = [str(Path(sys.executable).parent / "fastpoetry")]
ENTRY_POINTS = pytest.mark.parametrize(
    "entry", [PYTHON_M, SCRIPT], ids=["python-m", "console-script"]
)

#: The options serve and proxy share.
SERVER_OPTIONS = (
    "--port",
    "--iface",
    "--shutdown-timeout",
    "--send-timeout",
    "--max-poem-size",
    "--summary-interval",
    "--log-level",
    "--log-target",
)

SERVE_OPTIONS = (
    "--poem",
    "--workers",
    "--proxy-protocol",
    "--proxy-protocol-timeout",
    "--tls-cert",
    "--tls-key",
    "--tls-handshake-timeout",
    *SERVER_OPTIONS,
)

LANTERN = POEMS / "lantern.txt"
LEDGER = POEMS / "harbour-ledger.txt"

# A line the server logs to standard error; anything else there (a
# traceback, say) is not a one-line error.
LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} fastpoetry\[\d+\] (DEBUG|INFO|WARNING|ERROR): .+"
)

# Bound to 127.0.0.1 on a port of its own choosing, so a server that wrongly
# starts does not collide with anything and is caught by the hang guard.
LOCAL = ["--iface", "127.0.0.1", "--port", "0"]


def run(
    *args: str, entry: list[str] = PYTHON_M, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command line to completion (WAIT is a hang guard)."""
    return subprocess.run(
        [*entry, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        env=env if env is not None else clean_env(),
        timeout=WAIT,
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr that contains ``words``."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastpoetry"), lines[0]
    assert "error:" in lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def assert_failed_to_start(
    result: subprocess.CompletedProcess[str], notify: NotifySocket, *words: str
) -> None:
    """Exit 1, one ERROR log line with ``words``, no traceback, STATUS=Failed to start."""
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    strays = [line for line in lines if not LOG_LINE.fullmatch(line)]
    assert not strays, result.stderr
    errors = [line for line in lines if " ERROR: " in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    status = notify.wait_for("STATUS")["STATUS"]
    assert status.startswith("Failed to start: "), status
    for word in words:
        assert word in status, f"{word!r} not in {status!r}"
    # The process has exited: whatever it sent is already queued.
    assert not any("READY" in message for message in notify.drain(0.01)), notify.messages


# -- version and help ----------------------------------------------------------


@ENTRY_POINTS
def test_version(entry: list[str]) -> None:
    """--version prints the package version and exits 0."""
    result = run("--version", entry=entry)
    assert result.returncode == 0, result
    assert result.stdout == f"fastpoetry {fastpoetry.__version__}\n"
    assert result.stderr == ""


def test_version_is_the_released_one() -> None:
    """The version the command prints is 0.2.0, the one this test suite is for."""
    assert run("--version").stdout == "fastpoetry 0.2.0\n"


@ENTRY_POINTS
def test_help_names_the_serve_command(entry: list[str]) -> None:
    """--help exits 0 and lists the serve command and --version."""
    result = run("--help", entry=entry)
    assert result.returncode == 0, result
    assert result.stderr == ""
    assert re.search(r"^\s+serve\s", result.stdout, re.MULTILINE), result.stdout
    assert "--version" in result.stdout


def test_serve_help_names_every_option() -> None:
    """serve --help exits 0 and documents every serve option."""
    result = run("serve", "--help")
    assert result.returncode == 0, result
    assert result.stderr == ""
    for option in SERVE_OPTIONS:
        assert re.search(rf"^\s+{option}\b", result.stdout, re.MULTILINE), option
    assert "SIGHUP" in result.stdout and "SIGTERM" in result.stdout


PROXY_OPTIONS = ("--upstream", "--timeout", "--refresh", *SERVER_OPTIONS)


def test_proxy_help_names_every_option() -> None:
    """proxy --help exits 0 and documents every proxy option and what SIGHUP does."""
    result = run("proxy", "--help")
    assert result.returncode == 0, result
    for option in PROXY_OPTIONS:
        assert re.search(rf"^\s+{option}\b", result.stdout, re.MULTILINE), option
    assert "SIGHUP" in result.stdout


# -- usage errors: exit 2 --------------------------------------------------------


USAGE_ERRORS = {
    "no command": ([], ["COMMAND", "required"]),
    "unknown command": (["recite"], ["'recite'", "invalid choice"]),
    "unknown serve option": (["serve", "--verbose"], ["--verbose", "unrecognized"]),
    "unknown global option": (["--verbose", "serve"], ["--verbose", "unrecognized"]),
    "port -1": (["serve", "--port", "-1"], ["--port", "'-1'"]),
    "port 65536": (["serve", "--port", "65536"], ["--port", "'65536'"]),
    "port abc": (["serve", "--port", "abc"], ["--port", "'abc'"]),
    "shutdown-timeout 0": (["serve", "--shutdown-timeout", "0"], ["timeout", "'0'"]),
    "shutdown-timeout -1": (["serve", "--shutdown-timeout", "-1"], ["timeout", "'-1'"]),
    "shutdown-timeout nan": (["serve", "--shutdown-timeout", "nan"], ["timeout", "'nan'"]),
    "shutdown-timeout inf": (["serve", "--shutdown-timeout", "inf"], ["timeout", "'inf'"]),
    "max-poem-size 0": (["serve", "--max-poem-size", "0"], ["--max-poem-size", "'0'", "not a size"]),
    "max-poem-size 1T": (["serve", "--max-poem-size", "1T"], ["--max-poem-size", "'1T'", "K, M or G"]),
    "max-poem-size -5K": (["serve", "--max-poem-size=-5K"], ["--max-poem-size", "'-5K'"]),
    "port for no poem": (["serve", "--port", "ballad=7000"], ["--port ballad=7000", "no --poem is named 'ballad'"]),
    "two unnamed ports": (["serve", "--port", "7000", "--port", "7001"], ["--port", "without a NAME"]),
    "proxy protocol for no poem": (
        ["serve", "--poem", f"a={LANTERN}", "--proxy-protocol", "ballad"],
        ["--proxy-protocol ballad", "no --poem is named 'ballad'"],
    ),
    "proxy protocol timeout 0": (["serve", "--proxy-protocol-timeout", "0"], ["--proxy-protocol-timeout", "'0'"]),
    "tls cert without key": (["serve", "--tls-cert", "tls.crt"], ["--tls-key: none is given", "without a NAME="]),
    "tls key without cert": (["serve", "--tls-key", "tls.key"], ["--tls-cert: none is given", "without a NAME="]),
    "tls named key without its cert": (
        ["serve", "--poem", f"a={LANTERN}", "--tls-cert", "tls.crt", "--tls-key", "tls.key", "--tls-key", "a=a.key"],
        ["--tls-cert: none is given for the name 'a'"],
    ),
    "tls cert for no poem": (
        ["serve", "--tls-cert", "ballad=tls.crt", "--tls-key", "ballad=tls.key"],
        ["--tls-cert ballad=tls.crt", "no --poem is named 'ballad'"],
    ),
    "two unnamed tls certs": (
        ["serve", "--tls-cert", "a.crt", "--tls-cert", "b.crt", "--tls-key", "a.key"],
        ["--tls-cert", "without a NAME=", "more than once"],
    ),
    "tls handshake timeout 0": (["serve", "--tls-handshake-timeout", "0"], ["--tls-handshake-timeout", "'0'"]),
    "port with empty name": (["serve", "--port", "=7000"], ["--port", "empty NAME"]),
    "same port name twice": (
        ["serve", "--poem", f"a={LANTERN}", "--port", "a=7000", "--port", "a=7001"],
        ["--port", "'a'", "more than once"],
    ),
    "proxy without upstream": (["proxy"], ["--upstream", "required"]),
    "proxy upstream without port": (["proxy", "--upstream", "localhost"], ["--upstream", "'localhost'"]),
    "proxy upstream port 0": (["proxy", "--upstream", "localhost:0"], ["--upstream", "1 to 65535"]),
    "proxy upstream bare IPv6": (["proxy", "--upstream", "::1:10000"], ["--upstream", "brackets"]),
    "proxy refresh 0": (["proxy", "--upstream", "localhost:1", "--refresh", "0"], ["--refresh", "'0'"]),
    "poem without name": (["serve", "--poem", f"={LANTERN}"], ["--poem", "empty NAME"]),
    "poem without file": (["serve", "--poem", "name="], ["--poem", "'name='", "no FILE"]),
    "poem name with colon": (["serve", "--poem", f"a:b={LANTERN}"], ["--poem", "'a:b'", "':'"]),
    "poem name too long": (["serve", "--poem", f"{'n' * 256}={LANTERN}"], ["--poem", "up to 255"]),
    "same name twice": (
        ["serve", *LOCAL, "--poem", f"verse={LANTERN}", "--poem", f"verse={LEDGER}"],
        ["--poem", "'verse'", "more than once"],
    ),
    "two unnamed poems": (
        ["serve", *LOCAL, "--poem", str(LANTERN), "--poem", str(LEDGER)],
        ["--poem", "without a NAME"],
    ),
}


@pytest.mark.parametrize("args, words", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_error_is_one_line_and_exit_2(args: list[str], words: list[str]) -> None:
    """A usage error exits 2 with one line on stderr that names the problem."""
    assert_usage_error(run(*args), *words)


# -- runtime errors: exit 1 ------------------------------------------------------


def _missing(tmp_path: Path) -> str:
    return str(tmp_path / "no-such-poem.txt")


def _directory(tmp_path: Path) -> str:
    (tmp_path / "poems.d").mkdir()
    return str(tmp_path / "poems.d")


def _empty(tmp_path: Path) -> str:
    (tmp_path / "empty.txt").write_bytes(b"")
    return str(tmp_path / "empty.txt")


def _not_utf8(tmp_path: Path) -> str:
    (tmp_path / "latin1.txt").write_bytes("Ça ira, ça ira\n".encode("latin-1"))
    return str(tmp_path / "latin1.txt")


def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "poem.fifo")
    return str(tmp_path / "poem.fifo")


def _dev_null(tmp_path: Path) -> str:
    return os.devnull


def _huge(tmp_path: Path) -> str:
    # Sparse: a gigabyte of nothing on disk, refused before a byte is read.
    with open(tmp_path / "huge.txt", "wb") as file:
        file.truncate(1024**3)
    return str(tmp_path / "huge.txt")


BAD_POEMS: dict[str, tuple[Callable[[Path], str], str]] = {
    "missing": (_missing, "no such file or directory"),
    "directory": (_directory, "not a regular file (a directory)"),
    "empty": (_empty, "the file is empty"),
    "not UTF-8": (_not_utf8, "not UTF-8 text (byte 0xc7 at offset 0)"),
    "FIFO": (_fifo, "not a regular file (a FIFO)"),
    "/dev/null": (_dev_null, "not a regular file (a character device)"),
    "huge": (_huge, "too big for a poem: 1073741824 bytes, more than the largest poem allowed (16777216 bytes)"),
}


@pytest.mark.parametrize("make, reason", BAD_POEMS.values(), ids=BAD_POEMS.keys())
def test_unservable_poem_is_one_error_and_exit_1(
    tmp_path: Path, notify_socket: NotifySocket, make: Callable[[Path], str], reason: str
) -> None:
    """A poem that cannot be served: exit 1, one error naming file and reason."""
    path = make(tmp_path)
    result = run("serve", *LOCAL, "--poem", path, env=clean_env(NOTIFY_SOCKET=notify_socket.path))
    assert_failed_to_start(result, notify_socket, f"cannot load a poem from {path}: {reason}")


def test_poem_over_max_poem_size_is_one_error_and_exit_1(notify_socket: NotifySocket) -> None:
    """--max-poem-size takes K, M and G; a poem over it is refused at start."""
    size = LEDGER.stat().st_size
    result = run(
        "serve", *LOCAL, "--poem", str(LEDGER), "--max-poem-size", "3K",
        env=clean_env(NOTIFY_SOCKET=notify_socket.path),
    )
    assert size > 3 * 1024
    reason = f"too big for a poem: {size} bytes, more than the largest poem allowed (3072 bytes)"
    assert_failed_to_start(result, notify_socket, f"cannot load a poem from {LEDGER}: {reason}")


@pytest.mark.parametrize("limit", ["4k", "1M", str(LEDGER.stat().st_size)])
def test_poem_within_max_poem_size_is_served(start_server: Callable[..., Server], limit: str) -> None:
    """A poem up to --max-poem-size, the limit itself included, is served."""
    server = start_server("serve", *LOCAL, "--poem", str(LEDGER), "--max-poem-size", limit)
    server.wait_ready()
    assert fetch(server.address()) == LEDGER.read_bytes()
    assert terminate(server) == 0


def test_port_in_use_is_one_error_and_exit_1(notify_socket: NotifySocket) -> None:
    """A port someone else listens on: exit 1, naming the address and the reason."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "serve", "--iface", "127.0.0.1", "--port", str(port),
            env=clean_env(NOTIFY_SOCKET=notify_socket.path),
        )
    assert_failed_to_start(result, notify_socket, f"127.0.0.1:{port}", "address already in use")


def test_unresolvable_iface_is_one_error_and_exit_1(notify_socket: NotifySocket) -> None:
    """An --iface that does not resolve: exit 1, naming it."""
    # .invalid never resolves (RFC 6761).
    result = run(
        "serve", "--iface", "poetry.invalid", "--port", "0",
        env=clean_env(NOTIFY_SOCKET=notify_socket.path),
    )
    assert_failed_to_start(result, notify_socket, "cannot resolve 'poetry.invalid'")


# -- the default --iface: the loopback addresses, never looked up -----------------


def _warnings(log: str) -> list[str]:
    # Run as root by a root test run, it rightly says it needs no privileges.
    return [line for line in log.splitlines() if " WARNING: " in line and "running as root" not in line]


def test_serve_listens_on_both_loopback_addresses_where_localhost_resolves_to_nothing(
    no_localhost: Callable[..., NoLocalhost], start_server: Callable[..., Server]
) -> None:
    """With no --iface, serve listens on 127.0.0.1 and ::1 without looking localhost up.

    Where nothing resolves the name (a root without /etc/hosts, as
    debootstrap's minbase makes), a lookup would fail the start.
    """
    namespaces = no_localhost()
    server = start_server("serve", command=namespaces.command(*PYTHON_M))
    server.wait_ready()
    log = server.log()
    assert "INFO: serving default-poem.txt on 127.0.0.1:10000\n" in log
    assert "INFO: serving default-poem.txt on [::1]:10000\n" in log
    assert not _warnings(log), log
    expected = DEFAULT_POEM.read_bytes()
    assert namespaces.fetch("127.0.0.1", 10000) == expected
    assert namespaces.fetch("::1", 10000) == expected
    assert terminate(server) == 0


def test_serve_without_ipv6_listens_on_127_0_0_1_and_warns_once(
    no_localhost: Callable[..., NoLocalhost], start_server: Callable[..., Server]
) -> None:
    """IPv6 disabled: the default --iface is 127.0.0.1 alone, with one warning that names ::1.

    As for any address of a family the host cannot use, the start goes on
    as long as another address could be bound.
    """
    namespaces = no_localhost(ipv6=False)
    server = start_server("serve", command=namespaces.command(*PYTHON_M))
    server.wait_ready()
    log = server.log()
    [warning] = _warnings(log)
    assert re.search(r"WARNING: not listening on \[::1\]:10000 \(.+\)$", warning), warning
    assert "INFO: serving default-poem.txt on 127.0.0.1:10000\n" in log
    size = DEFAULT_POEM.stat().st_size
    assert f"INFO: ready: serving default-poem.txt ({size} bytes) on 1 socket;" in log
    assert namespaces.fetch("127.0.0.1", 10000) == DEFAULT_POEM.read_bytes()
    assert terminate(server) == 0


@pytest.mark.parametrize(
    "args, status",
    [
        (["--version"], 0),
        (["serve", "--port", "abc"], 2),
        (["serve", *LOCAL, "--poem", "/nonexistent/poem.txt"], 1),
    ],
    ids=["ok", "usage", "runtime"],
)
def test_console_script_passes_on_the_exit_status(args: list[str], status: int) -> None:
    """The installed ``fastpoetry`` script exits as ``python -m fastpoetry`` does."""
    assert run(*args, entry=SCRIPT).returncode == status
    assert run(*args, entry=PYTHON_M).returncode == status


# -- behind a balancer ------------------------------------------------------------


def _fetch_after(address: tuple[str, int], header: bytes) -> bytes:
    """Send ``header``, then read to the end; a reset reads as b'RESET'."""
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(header)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            return b"RESET"
        return b"".join(chunks)


def test_proxy_protocol_named_expects_the_header_on_that_poems_sockets_only(
    start_server: Callable[..., Server],
) -> None:
    """--proxy-protocol NAME: the sockets of the poem NAME want a header, the others serve as ever."""
    header = b"PROXY TCP4 198.51.100.7 192.0.2.1 40123 10000\r\n"
    with listening_socket() as behind, listening_socket() as direct:
        server = start_activated(
            start_server, [behind, direct], "serve", "--poem", f"behind={LANTERN}", "--poem", str(LEDGER),
            "--proxy-protocol", "behind", "--log-level", "debug", "--log-target", "stderr",
            names=["behind", "direct"],
        )
        server.wait_ready()
        assert _fetch_after(behind.getsockname(), header) == LANTERN.read_bytes()
        assert _fetch_after(behind.getsockname(), b"no header\r\n") == b"RESET"
        assert fetch(direct.getsockname()) == LEDGER.read_bytes()
        server.wait_for_log(r"sending \d+ bytes of poetry to 198\.51\.100\.7:40123 via 127\.0\.0\.1:\d+")
        server.wait_for_log(r"reset a connection from 127\.0\.0\.1:\d+: malformed PROXY protocol header")
        assert terminate(server) == 0


def test_tls_named_serves_that_poems_sockets_over_tls_and_the_others_plain(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """--tls-cert NAME=FILE --tls-key NAME=FILE: the poem NAME over TLS, the other poem over plain TCP."""
    pair = make_pair(tmp_path / "tls")
    with listening_socket() as secure, listening_socket() as plain:
        server = start_activated(
            start_server, [secure, plain], "serve", "--poem", f"secure={LANTERN}", "--poem", str(LEDGER),
            "--tls-cert", f"secure={pair.cert}", "--tls-key", f"secure={pair.key}",
            names=["secure", "plain"],
        )
        server.wait_ready()
        context = ssl.create_default_context()
        context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
        pair.ca.configure_trust(context)
        with socket.create_connection(secure.getsockname(), timeout=WAIT) as sock:
            with context.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
                received = b""
                while piece := tls.recv(65536):
                    received += piece
        assert received == LANTERN.read_bytes()
        assert fetch(plain.getsockname()) == LEDGER.read_bytes()
        assert re.search(r"serving secure over TLS on ", server.log())
        assert re.search(r"serving harbour-ledger\.txt on ", server.log())
        assert terminate(server) == 0


# -- the default poem ------------------------------------------------------------


def test_serve_without_poem_serves_the_bundled_one(start_server: Callable[..., Server]) -> None:
    """``serve`` with no --poem serves the poem that comes with the package."""
    server = start_server("serve", *LOCAL)
    server.wait_ready()
    expected = DEFAULT_POEM.read_bytes()
    assert fetch(server.address()) == expected
    loaded = re.search(r"loaded a poem from: (.+) \((\d+) bytes\)", server.log())
    assert loaded is not None, server.log()
    assert Path(loaded.group(1)).name == DEFAULT_POEM.name
    assert int(loaded.group(2)) == len(expected)
    assert terminate(server) == 0


def test_a_broken_installation_exits_70_so_that_the_unit_restarts_it(tmp_path: Path) -> None:
    """A module that fails to import (here trio) is a crash, not a bad configuration.

    Python's own exit status for it would be 1, which the unit does not
    restart; under socket activation each client would then start the
    server again at once.
    """
    (tmp_path / "trio").mkdir()
    (tmp_path / "trio" / "__init__.py").write_text("raise ImportError('trio is broken (made by the test)')\n")
    result = subprocess.run(
        [sys.executable, "-m", "fastpoetry", "serve", "--poem", str(LANTERN), *LOCAL],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT,
        env=clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path])),
    )
    assert result.returncode == 70, result
    assert "crashed" in result.stderr
    assert "ImportError: trio is broken (made by the test)" in result.stderr


def test_a_crash_exits_70_with_the_traceback_logged() -> None:
    """An unexpected exception (a bug) exits 70, which the unit restarts after, not 1."""
    crashing = (
        "import sys; from fastpoetry import app, cli\n"
        "def crash(config):\n"
        "    raise RuntimeError('a bug nobody foresaw')\n"
        "app.run = crash\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", crashing, "serve", "--poem", str(LANTERN), *LOCAL],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=clean_env(), timeout=WAIT,
    )
    assert result.returncode == 70, result
    assert "CRITICAL: crashed" in result.stderr
    assert "RuntimeError: a bug nobody foresaw" in result.stderr

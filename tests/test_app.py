"""The server as a running process: serving, shutting down, reloading.

Every test starts ``python -m fastpoetry serve`` and talks to it over real
sockets and real signals; its log is standard error, written to a file.
Waits are hang guards (helpers.WAIT); no test asserts how long anything took.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import (
    POEMS,
    WAIT,
    NotifySocket,
    Server,
    clean_env,
    count_in_log,
    fetch,
    fetch_from,
    listening_ports,
    make_poem,
    read_to_end,
    terminate,
    wait_for_count,
    wait_until,
)

LANTERN = POEMS / "lantern.txt"
LEDGER = POEMS / "harbour-ledger.txt"
WINTER = POEMS / "long-winter.txt"

#: A poem far larger than any socket buffer: it is always sent by a task of
#: its own and stays in flight while its client does not read.
BIG = 16 * 1024 * 1024

LOCAL = ["--iface", "127.0.0.1", "--port", "0"]

StartServer = Callable[..., Server]
ServeForeground = Callable[..., Server]


# -- helpers -------------------------------------------------------------------


def assert_clean_log(server: Server) -> None:
    """No traceback and no error in the log."""
    log = server.log()
    assert "Traceback" not in log, log
    assert " ERROR: " not in log, log


def fetch_after_shutdown(address: tuple[str, int]) -> bytes | None:
    """Try to fetch from a server that stopped accepting: None if refused."""
    try:
        return fetch(address)
    except ConnectionRefusedError:
        return None
    except ConnectionResetError:
        return b""


@pytest.fixture(scope="module")
def big_poem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A 16 MiB poem, written once for the module."""
    path = tmp_path_factory.mktemp("big") / "big.txt"
    return path, make_poem(path, BIG, seed="big")


@pytest.fixture
def slow_client() -> Iterator[Callable[[tuple[str, int]], socket.socket]]:
    """Connect with a tiny receive buffer; such a client reads only when the test says so.

    Once its first bytes have arrived the server has accepted it and is sending
    the rest of a big poem from a task of its own: the poem is in flight.
    """
    clients: list[socket.socket] = []

    def connect(address: tuple[str, int]) -> socket.socket:
        sock = socket.socket()
        clients.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT)
        sock.connect(address)
        return sock

    yield connect
    for sock in clients:
        sock.close()


# -- serving in the foreground ---------------------------------------------------


def test_serves_sequential_and_concurrent_clients(serve_foreground: ServeForeground) -> None:
    """Every client, one after another or many at once, gets the poem byte for byte."""
    server = serve_foreground("--poem", str(WINTER))
    address = server.address()
    expected = WINTER.read_bytes()
    for _ in range(5):
        assert fetch(address) == expected
    with ThreadPoolExecutor(max_workers=16) as pool:
        poems = list(pool.map(lambda _: fetch(address), range(64)))
    assert len(poems) == 64
    assert all(poem == expected for poem in poems)
    assert terminate(server) == 0
    assert f"shut down after serving 69 poems ({69 * len(expected)} bytes)" in server.log()


def test_logs_what_it_loads_where_it_serves_and_that_it_is_ready(
    serve_foreground: ServeForeground,
) -> None:
    """The start-up log names the poem file, the address served on, and readiness."""
    server = serve_foreground("--poem", str(LANTERN))
    _, port = server.address()
    assert fetch(("127.0.0.1", port)) == LANTERN.read_bytes()
    log = server.log()
    size = LANTERN.stat().st_size
    loaded = log.index(f"INFO: loaded a poem from: {LANTERN} ({size} bytes)\n")
    serving = log.index(f"INFO: serving lantern.txt on 127.0.0.1:{port}\n")
    ready = log.index(f"INFO: ready: serving lantern.txt ({size} bytes) on 1 socket")
    assert loaded < serving < ready
    assert terminate(server) == 0
    assert "Traceback" not in server.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_warns_when_running_as_root(serve_foreground: ServeForeground) -> None:
    """As root it warns that it needs no privileges, pointing at User=."""
    server = serve_foreground("--poem", str(LANTERN))
    warnings = [line for line in server.log().splitlines() if " WARNING: " in line]
    assert len(warnings) == 1, server.log()
    assert "running as root" in warnings[0]
    assert "User=" in warnings[0]
    assert terminate(server) == 0


def _open_to_all(*paths: Path) -> bool:
    """Whether any user can reach (and read) ``paths``: every directory above is o+x."""
    for path in paths:
        if not path.stat().st_mode & stat.S_IROTH:
            return False
        if any(not parent.stat().st_mode & stat.S_IXOTH for parent in path.parents):
            return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a server as another user")
@pytest.mark.skipif(
    not _open_to_all(LANTERN, Path(sys.prefix) / "pyvenv.cfg", Path(__file__)),
    reason="the repository or the virtualenv is not readable by other users",
)
def test_no_root_warning_for_a_service_user(start_server: StartServer) -> None:
    """Run as an unprivileged user (nobody), it does not warn about root."""
    server = start_server(
        "serve", *LOCAL, "--poem", str(LANTERN), user=65534, group=65534, extra_groups=[]
    )
    server.wait_ready()
    assert fetch(server.address()) == LANTERN.read_bytes()
    assert "running as root" not in server.log()
    assert " WARNING: " not in server.log()
    assert terminate(server) == 0


def _open_files_limit(soft: int, hard: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _limits_of(pid: int) -> tuple[int, int]:
    """The soft and hard open files limits of process ``pid``, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for {pid}")


def test_raises_its_open_files_limit_to_the_hard_limit(start_server: StartServer) -> None:
    """Started with systemd's soft 1024, it may hold as many clients as the hard limit allows."""
    server = start_server(
        "serve", *LOCAL, "--poem", str(LANTERN), "--log-level", "debug",
        preexec_fn=_open_files_limit(1024, 4096),
    )
    server.wait_ready()
    assert _limits_of(server.pid) == (4096, 4096)
    assert "DEBUG: raised the open files limit from 1024 to 4096\n" in server.log()
    assert fetch(server.address()) == LANTERN.read_bytes()
    assert terminate(server) == 0
    assert_clean_log(server)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_cleanly_and_counts_poems(
    serve_foreground: ServeForeground, signum: signal.Signals
) -> None:
    """SIGTERM or SIGINT: exit 0, and the log tells how many poems were served."""
    server = serve_foreground("--poem", str(LANTERN))
    address = server.address()
    size = LANTERN.stat().st_size
    for _ in range(3):
        assert fetch(address) == LANTERN.read_bytes()
    server.send_signal(signum)
    assert server.wait() == 0
    log = server.log()
    assert f"INFO: received {signum.name}: shutting down\n" in log
    assert f"INFO: shut down after serving 3 poems ({3 * size} bytes)\n" in log
    assert log.index("shutting down") < log.index("shut down after")
    assert_clean_log(server)


def test_several_named_poems_need_an_unnamed_one_in_the_foreground(
    start_server: StartServer, notify_socket: NotifySocket
) -> None:
    """Only named poems and no systemd sockets: exit 1, asking for a poem without a name."""
    server = start_server(
        "serve", *LOCAL, "--poem", f"a={LANTERN}", "--poem", f"b={LEDGER}",
        env=clean_env(NOTIFY_SOCKET=notify_socket.path),
    )
    assert server.wait() == 1
    log = server.log()
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if " ERROR: " in line]
    assert len(errors) == 1, log
    assert "127.0.0.1:" in errors[0]
    assert "give one --poem FILE without a name" in errors[0]
    status = notify_socket.wait_for("STATUS")["STATUS"]
    assert status.startswith("Failed to start: ") and "without a name" in status


# -- graceful shutdown -----------------------------------------------------------


@pytest.mark.slow
def test_shutdown_lets_a_slow_client_finish(
    serve_foreground: ServeForeground,
    slow_client: Callable[[tuple[str, int]], socket.socket],
    big_poem: tuple[Path, bytes],
) -> None:
    """SIGTERM mid-transfer: no new clients, but the slow one gets its whole poem."""
    path, poem = big_poem
    server = serve_foreground(
        "--poem", str(path), "--shutdown-timeout", "20", "--send-timeout", "300"
    )
    address = server.address()
    assert listening_ports(server.pid) == {address[1]}
    client = slow_client(address)
    received = [client.recv(4096)]
    for _ in range(8):  # reading slowly
        received.append(client.recv(4096))
        time.sleep(0.01)

    server.send_signal(signal.SIGTERM)
    server.wait_for_log(
        r"shutting down: accepting no more clients, waiting up to 20 s for 1 poem in flight"
    )
    # It stops listening while the poem is still on its way...
    wait_until(lambda: not listening_ports(server.pid), "the listening socket is closed")
    assert fetch_after_shutdown(address) in (None, b"")
    assert server.process.poll() is None
    # ...and exits only once the slow client has it all.
    read_to_end(client, received)
    client.close()
    assert b"".join(received) == poem
    assert server.wait() == 0
    log = server.log()
    assert f"shut down after serving 1 poem ({len(poem)} bytes)" in log
    assert "shutdown timeout" not in log
    assert_clean_log(server)


@pytest.mark.slow
def test_shutdown_timeout_closes_connections_still_open(
    serve_foreground: ServeForeground,
    slow_client: Callable[[tuple[str, int]], socket.socket],
    big_poem: tuple[Path, bytes],
) -> None:
    """A client that never reads does not keep the server from exiting after the timeout."""
    path, poem = big_poem
    server = serve_foreground(
        "--poem", str(path), "--shutdown-timeout", "1", "--send-timeout", "300"
    )
    client = slow_client(server.address())
    received = [client.recv(4096)]  # the server is sending; now never read again

    assert terminate(server) == 0
    log = server.log()
    assert "WARNING: shutdown timeout: closed the connections still open" in log
    assert "shut down after serving 0 poems (0 bytes)" in log
    assert "Traceback" not in log
    # The connection was cut: the client gets what was buffered, then the end.
    try:
        read_to_end(client, received)
    except ConnectionResetError:
        pass
    got = b"".join(received)
    assert len(got) < len(poem)
    assert poem.startswith(got)


@pytest.mark.slow
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_ends_the_grace_period(
    serve_foreground: ServeForeground,
    slow_client: Callable[[tuple[str, int]], socket.socket],
    big_poem: tuple[Path, bytes],
    second: signal.Signals,
) -> None:
    """A second SIGTERM/SIGINT while waiting for poems in flight ends the wait; SIGHUP does not."""
    path, _ = big_poem
    # Only the second signal can end this shutdown within the hang guard.
    server = serve_foreground(
        "--poem", str(path), "--shutdown-timeout", "300", "--send-timeout", "300"
    )
    client = slow_client(server.address())
    client.recv(4096)

    server.send_signal(signal.SIGTERM)
    server.wait_for_log(r"waiting up to 300 s for 1 poem in flight")
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"INFO: ignoring SIGHUP while shutting down")
    assert server.process.poll() is None
    server.send_signal(second)
    assert server.wait() == 0
    log = server.log()
    assert f"INFO: received {second.name} again: not waiting any longer" in log
    assert "shut down after serving 0 poems" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_client_that_has_its_poem_does_not_hold_up_shutdown(
    serve_foreground: ServeForeground,
) -> None:
    """A client that read the whole poem but stays connected does not make shutdown time out."""
    server = serve_foreground("--poem", str(LANTERN), "--shutdown-timeout", "2")
    with socket.create_connection(server.address(), timeout=WAIT) as client:
        received: list[bytes] = []
        read_to_end(client, received)  # the whole poem, and its end
        assert b"".join(received) == LANTERN.read_bytes()
        assert terminate(server) == 0
    log = server.log()
    assert "waiting up to 2 s for 0 poems in flight" in log
    assert "shutdown timeout" not in log, log


# -- reloading -------------------------------------------------------------------


READY = r"INFO: ready: "


def _replace(path: Path, content_from: Path) -> None:
    """Put a copy of ``content_from`` at ``path`` atomically (write, then rename)."""
    staging = path.with_name(path.name + ".new")
    shutil.copyfile(content_from, staging)
    os.replace(staging, path)


@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
def test_sighup_serves_the_changed_poem(
    serve_foreground: ServeForeground, notify_socket: NotifySocket, tmp_path: Path, how: str
) -> None:
    """After SIGHUP the new poem is served; systemd hears RELOADING=1, then READY=1."""
    path = tmp_path / "poem.txt"
    old = make_poem(path, 5000, seed="old")
    server = serve_foreground("--poem", str(path), env=clean_env(NOTIFY_SOCKET=notify_socket.path))
    notify_socket.wait_for("READY", "1")
    address = server.address()
    assert fetch(address) == old

    if how == "replaced":
        new = make_poem(tmp_path / "next.txt", 7000, seed="new")
        _replace(path, tmp_path / "next.txt")
    else:
        new = make_poem(path, 7000, seed="new")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 2)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    assert fetch(address) == new
    log = server.log()
    assert "INFO: received SIGHUP: reloading 1 poem\n" in log
    assert f"INFO: loaded a poem from: {path} ({len(new)} bytes)\n" in log

    messages = notify_socket.drain(0.05)  # sent before the "ready:" line was logged
    first_ready = next(i for i, m in enumerate(messages) if "READY" in m)
    reload_story = [m for m in messages[first_ready + 1 :] if "RELOADING" in m or "READY" in m]
    story = [("RELOADING" in m, m.get("READY")) for m in reload_story]
    assert story == [(True, None), (False, "1")]
    reloading, ready = reload_story
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    assert f"({len(new)} bytes)" in ready["STATUS"]
    assert terminate(server) == 0
    assert_clean_log(server)


@pytest.mark.parametrize("size", [3000, 2 * 1024 * 1024], ids=["3 KB", "2 MiB"])
def test_poem_edited_in_place_is_served_as_loaded_until_reload(
    serve_foreground: ServeForeground, tmp_path: Path, size: int
) -> None:
    """Rewriting the file in place, without SIGHUP, never reaches a client.

    An editor rewrites the very inode (truncate, write a poem of another
    length) again and again while clients fetch: every client gets exactly
    the poem loaded at start.  The 2 MiB poem is sent by tasks while the
    file changes under them.  SIGHUP then serves the last edit.
    """
    path = tmp_path / "poem.txt"
    loaded = make_poem(path, size, seed="loaded")
    inode = path.stat().st_ino
    server = serve_foreground("--poem", str(path))
    address = server.address()
    stop = threading.Event()
    edits = 0

    def edit() -> None:
        nonlocal edits
        while not stop.is_set():
            edits += 1
            text = f"edit {edits}: the ink is still wet\n".encode() * (1 + edits % 7)
            with open(path, "r+b") as file:  # same inode, as an editor saving in place
                file.truncate(0)
                file.write(text[: len(text) // 2])
                file.flush()
                file.write(text[len(text) // 2 :])
                file.truncate()

    editor = threading.Thread(target=edit)
    editor.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: fetch(address), range(200)))
    finally:
        stop.set()
        editor.join(WAIT)
    assert edits > 0 and path.stat().st_ino == inode
    wrong = [len(reply) for reply in replies if reply != loaded]
    assert not wrong, f"{len(wrong)} of {len(replies)} replies were not the loaded poem: sizes {wrong[:5]}"
    assert count_in_log(server, "loaded a poem from") == 1

    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 2)
    assert fetch(address) == path.read_bytes() != loaded
    assert terminate(server) == 0
    assert_clean_log(server)


@pytest.mark.slow
def test_reload_under_load_serves_whole_poems_only(
    serve_foreground: ServeForeground, tmp_path: Path
) -> None:
    """Clients fetching through repeated reloads each get exactly the old or the new poem."""
    size = 2 * 1024 * 1024
    alpha_file, bravo_file = tmp_path / "alpha.txt", tmp_path / "bravo.txt"
    poems = {
        "alpha": make_poem(alpha_file, size, seed="alpha"),
        "bravo": make_poem(bravo_file, size + 4321, seed="bravo"),
    }
    path = tmp_path / "poem.txt"
    shutil.copyfile(alpha_file, path)
    server = serve_foreground("--poem", str(path))
    address = server.address()

    seen: list[str] = []  # which poem each fetch got (the bytes are too many to keep)
    failures: list[BaseException | str] = []
    stop = threading.Event()

    def keep_fetching() -> None:
        while not stop.is_set():
            try:
                poem = fetch(address)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                return
            name = next((name for name, text in poems.items() if poem == text), None)
            if name is None:
                failures.append(f"a fetch got {len(poem)} bytes, neither poem")
            seen.append(name or "neither")

    fetchers = [threading.Thread(target=keep_fetching) for _ in range(3)]
    for thread in fetchers:
        thread.start()
    try:
        for reload in range(6):
            name = "bravo" if reload % 2 == 0 else "alpha"
            _replace(path, bravo_file if name == "bravo" else alpha_file)
            server.send_signal(signal.SIGHUP)
            wait_for_count(server, READY, reload + 2)
            assert fetch(address) == poems[name]
            # More fetches than there are fetchers: at least one of them
            # started after this reload.
            fetched = len(seen)
            wait_until(lambda: len(seen) > fetched + len(fetchers) or failures, "more fetches")
            assert not failures, failures[:3]
    finally:
        stop.set()
        for thread in fetchers:
            thread.join(WAIT)
    assert not failures, failures[:3]
    assert set(seen) == {"alpha", "bravo"}
    assert terminate(server) == 0
    assert_clean_log(server)


def _empty(path: Path) -> str:
    staging = path.with_name("staging")
    staging.write_bytes(b"")
    os.replace(staging, path)
    return "the file is empty"


def _not_utf8(path: Path) -> str:
    staging = path.with_name("staging")
    staging.write_bytes(b"caf\xe9 au lait\n")
    os.replace(staging, path)
    return "not UTF-8 text (byte 0xe9 at offset 3)"


def _missing(path: Path) -> str:
    path.unlink()
    return "no such file or directory"


def _directory(path: Path) -> str:
    path.unlink()
    path.mkdir()
    return "not a regular file (a directory)"


def _too_big(path: Path) -> str:
    staging = path.with_name("staging")
    with open(staging, "wb") as file:
        file.truncate(16 * 1024**2 + 1)  # one byte over the default limit
    os.replace(staging, path)
    return f"too big for a poem: {16 * 1024**2 + 1} bytes, more than the largest poem allowed ({16 * 1024**2} bytes)"


BREAKAGES: dict[str, Callable[[Path], str]] = {
    "too big": _too_big,
    "empty": _empty,
    "not UTF-8": _not_utf8,
    "missing": _missing,
    "directory": _directory,
}


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_failed_reload_keeps_the_old_poem_until_fixed(
    serve_foreground: ServeForeground,
    notify_socket: NotifySocket,
    tmp_path: Path,
    breakage: Callable[[Path], str],
) -> None:
    """A poem that cannot be reloaded: the old one stays, the log and STATUS say why."""
    path = tmp_path / "poem.txt"
    old = make_poem(path, 3000, seed="old")
    server = serve_foreground("--poem", str(path), env=clean_env(NOTIFY_SOCKET=notify_socket.path))
    notify_socket.wait_for("READY", "1")
    address = server.address()

    reason = breakage(path)
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 2)
    assert fetch(address) == old
    failure = f"cannot load a poem from {path}: {reason}"
    errors = [line for line in server.log().splitlines() if " ERROR: " in line]
    assert len(errors) == 1, server.log()
    assert "reload failed" in errors[0] and failure in errors[0]
    status = notify_socket.wait_for("READY", "1")["STATUS"]
    assert f"last reload failed: {failure}" in status

    if path.is_dir():
        path.rmdir()
    new = make_poem(tmp_path / "fixed.txt", 4000, seed="new")
    os.replace(tmp_path / "fixed.txt", path)
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 3)
    assert fetch(address) == new
    status = notify_socket.wait_for("READY", "1")["STATUS"]
    assert "reload failed" not in status
    assert f"({len(new)} bytes)" in status
    assert terminate(server) == 0
    assert "Traceback" not in server.log()


def test_reload_replaces_every_poem_or_none(
    serve_foreground: ServeForeground, tmp_path: Path
) -> None:
    """With two poems, one unreadable makes the reload keep both old ones."""
    main, extra = tmp_path / "main.txt", tmp_path / "extra.txt"
    old = make_poem(main, 2000, seed="old")
    make_poem(extra, 1000, seed="extra")
    # In the foreground only the unnamed poem has a socket; the named one
    # is still read at every reload.
    server = serve_foreground("--poem", str(main), "--poem", f"extra={extra}")
    address = server.address()
    assert fetch(address) == old

    new = make_poem(tmp_path / "next.txt", 2500, seed="new")
    os.replace(tmp_path / "next.txt", main)
    _empty(extra)
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 2)
    assert fetch(address) == old
    failed = "reload failed, still serving the poems loaded before: cannot load a poem from"
    assert f"{failed} {extra}: the file is empty" in server.log()

    make_poem(tmp_path / "extra.new", 1000, seed="extra")
    os.replace(tmp_path / "extra.new", extra)
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 3)
    assert fetch(address) == new
    assert terminate(server) == 0


# -- signals while starting ------------------------------------------------------


def _default_sighup() -> None:
    # A test runner started with SIGHUP ignored (nohup) would pass that on.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


STARTING = r"INFO: fastpoetry \S+ starting"


def test_sighup_while_starting_is_a_reload(start_server: StartServer) -> None:
    """SIGHUP right after "starting": it still becomes ready, reloads, serves and stops cleanly."""
    server = start_server("serve", *LOCAL, "--poem", str(LANTERN), preexec_fn=_default_sighup)
    server.wait_for_log(STARTING)
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 2)  # started, then reloaded
    assert "received SIGHUP: reloading 1 poem" in server.log()
    assert fetch(server.address()) == LANTERN.read_bytes()
    assert terminate(server) == 0
    assert_clean_log(server)


def test_sighup_as_soon_as_the_process_exists(start_server: StartServer) -> None:
    """SIGHUP right after Popen: fatal only before the server could say "starting"."""
    server = start_server("serve", *LOCAL, "--poem", str(LANTERN), preexec_fn=_default_sighup)
    server.send_signal(signal.SIGHUP)
    wait_until(
        lambda: server.process.poll() is not None or re.search(READY, server.log()),
        "ready or gone",
    )
    if server.process.poll() is not None:
        # Killed by the default action before Python got to blocking it.
        assert server.process.returncode == -signal.SIGHUP, server.log()
        assert not re.search(STARTING, server.log()), server.log()
        return
    wait_for_count(server, READY, 2)  # the SIGHUP was held, then handled as a reload
    assert fetch(server.address()) == LANTERN.read_bytes()
    assert terminate(server) == 0
    assert_clean_log(server)


def _sighup_is_held_or_caught(pid: int) -> bool:
    """Whether ``pid`` holds SIGHUP as the server does, or has a handler for it.

    Held means blocked together with at most SIGINT and SIGTERM: Python's
    start-up blocks every signal for a moment too (while a thread starts),
    which is not the server holding it.
    """
    status = Path(f"/proc/{pid}/status").read_text()
    masks = dict(re.findall(r"^(SigBlk|SigCgt):\s*([0-9a-f]+)$", status, re.MULTILINE))
    blocked, caught = int(masks["SigBlk"], 16), int(masks["SigCgt"], 16)
    hup = 1 << (signal.SIGHUP - 1)
    ours = hup | 1 << (signal.SIGINT - 1) | 1 << (signal.SIGTERM - 1)
    return bool(caught & hup) or (blocked & hup != 0 and blocked & ~ours == 0)


def test_sighup_once_signals_are_held_is_a_reload(start_server: StartServer) -> None:
    """SIGHUP once the process has blocked it (before the event loop runs) is a reload later."""
    server = start_server("serve", *LOCAL, "--poem", str(LANTERN), preexec_fn=_default_sighup)
    deadline = time.monotonic() + WAIT
    while not _sighup_is_held_or_caught(server.pid):  # no sleep: the window may be short
        assert server.process.poll() is None, server.log()
        assert time.monotonic() < deadline, "SIGHUP never blocked or caught"
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 2)  # started, then reloaded
    assert "received SIGHUP: reloading 1 poem" in server.log()
    assert fetch(server.address()) == LANTERN.read_bytes()
    assert terminate(server) == 0
    assert_clean_log(server)


def test_sigterm_while_starting_exits_cleanly(start_server: StartServer) -> None:
    """SIGTERM right after "starting": exit 0 with the shutdown story and no traceback."""
    server = start_server("serve", *LOCAL, "--poem", str(LANTERN))
    server.wait_for_log(STARTING)
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    log = server.log()
    assert "INFO: received SIGTERM: shutting down" in log
    assert "INFO: shut down after serving 0 poems (0 bytes)" in log
    assert_clean_log(server)


@pytest.mark.slow
def test_sighup_storm_through_shutdown_never_kills(serve_foreground: ServeForeground) -> None:
    """SIGHUPs arriving without pause, before, during and after SIGTERM: still exit 0."""
    server = serve_foreground("--poem", str(LANTERN))
    address = server.address()
    pidfd = os.pidfd_open(server.pid)  # no signal can reach a recycled pid
    sent = 0
    exited = threading.Event()

    def storm() -> None:
        nonlocal sent
        while not exited.is_set():
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGHUP)
            except ProcessLookupError:
                return
            sent += 1
            # A millisecond apart: Python-level signal handlers (trio's
            # receiver installs one) nest when a signal arrives while one
            # runs, so signals sent back to back from another core can
            # exhaust the recursion limit; that is CPython's, not ours.
            time.sleep(0.001)

    stormer = threading.Thread(target=storm)
    stormer.start()
    try:
        wait_for_count(server, r"received SIGHUP: reloading", 3)
        assert fetch(address) == LANTERN.read_bytes()
        server.send_signal(signal.SIGTERM)
        # Wait for the exit without reaping, so that the storm goes on to the end.
        wait_until(
            lambda: os.waitid(os.P_PID, server.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG),
            "the server exits",
        )
    finally:
        exited.set()
        stormer.join(WAIT)
        os.close(pidfd)
    assert sent > 3
    assert server.wait() == 0, server.log()
    log = server.log()
    assert "received SIGTERM: shutting down" in log
    assert "shut down after serving 1 poem" in log
    assert "Traceback" not in log


# -- what it logs ----------------------------------------------------------------


def test_periodic_summary_counts_poems_and_bytes(serve_foreground: ServeForeground) -> None:
    """With --summary-interval, the summaries add up to exactly what was served."""
    server = serve_foreground("--poem", str(LANTERN), "--summary-interval", "0.5")
    address = server.address()
    size = LANTERN.stat().st_size
    for _ in range(7):
        assert fetch(address) == LANTERN.read_bytes()
    pattern = (
        r"INFO: served (\d+) poems? \((\d+) bytes\) since the last summary; "
        r"(\d+) poems? in total"
    )

    def summaries() -> list[tuple[int, ...]]:
        return [tuple(map(int, found)) for found in re.findall(pattern, server.log())]

    wait_until(lambda: sum(s[0] for s in summaries()) >= 7, "summaries of 7 poems")
    found = summaries()
    assert sum(s[0] for s in found) == 7
    assert sum(s[1] for s in found) == 7 * size
    assert found[-1][2] == 7
    assert terminate(server) == 0


def test_debug_level_logs_every_client(serve_foreground: ServeForeground) -> None:
    """--log-level debug logs each client with the poem's size and the client's address."""
    server = serve_foreground("--poem", str(LANTERN), "--log-level", "debug")
    address = server.address()
    size = LANTERN.stat().st_size
    for _ in range(3):
        poem, port = fetch_from(address)
        assert poem == LANTERN.read_bytes()
        server.wait_for_log(rf"DEBUG: sending {size} bytes of poetry to 127\.0\.0\.1:{port}\n")
    assert count_in_log(server, r"DEBUG: sending \d+ bytes of poetry") == 3
    assert terminate(server) == 0


def test_info_level_does_not_log_every_client(serve_foreground: ServeForeground) -> None:
    """At the default level (info) single clients are not logged."""
    server = serve_foreground("--poem", str(LANTERN))
    address = server.address()
    for _ in range(3):
        assert fetch(address) == LANTERN.read_bytes()
    assert terminate(server) == 0
    log = server.log()
    assert "shut down after serving 3 poems" in log
    assert "bytes of poetry to" not in log
    assert " DEBUG: " not in log


def _read_some_then_reset(address: tuple[str, int], amount: int) -> int:
    """Read ``amount`` bytes of the poem, then reset the connection (RST, not FIN)."""
    with socket.create_connection(address, timeout=WAIT) as sock:
        received = 0
        while received < amount:
            chunk = sock.recv(min(65536, amount - received))
            assert chunk, "the poem ended early"
            received += len(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return received


@pytest.mark.parametrize("level", ["info", "debug"])
def test_clients_that_reset_mid_poem_cost_a_debug_line_at_most(
    serve_foreground: ServeForeground, tmp_path: Path, level: str
) -> None:
    """Resets in the middle of a big poem: nothing at info, one debug line each at most."""
    path = tmp_path / "big.txt"
    poem = make_poem(path, 4 * 1024 * 1024)
    server = serve_foreground("--poem", str(path), "--log-level", level)
    address = server.address()
    resets = 20
    for _ in range(resets):
        _read_some_then_reset(address, 64 * 1024)
    assert fetch(address) == poem  # and the next client is served whole
    assert terminate(server) == 0
    log = server.log()
    assert_clean_log(server)
    warnings = [line for line in log.splitlines() if " WARNING: " in line and "running as root" not in line]
    assert not warnings and "dropped" not in log, log
    gone = count_in_log(server, r"DEBUG: a client went away before it had its poem: (connection reset|broken pipe)\n")
    if level == "info":
        assert " DEBUG: " not in log
    else:
        # A reset that lands after the last send() is the kernel's business:
        # nothing to log then.  Never more than one line per client.
        assert 1 <= gone <= resets, log
        sending = count_in_log(server, r"DEBUG: sending \d+ bytes of poetry")
        assert sending == resets + 1
        startup = count_in_log(server, "DEBUG: raised the open files limit")
        assert count_in_log(server, " DEBUG: ") == startup + sending + gone, log


# -- several poems on several ports, in the foreground ------------------------------


def _serving_lines(server: Server) -> dict[str, tuple[str, int]]:
    """``{label: (host, port)}`` from the "serving LABEL on HOST:PORT" lines."""
    found = re.findall(r"INFO: serving (\S+) on (\d+\.\d+\.\d+\.\d+):(\d+)\n", server.log())
    return {label: (host, int(port)) for label, host, port in found}


def test_foreground_serves_each_named_poem_on_its_own_port(serve_foreground: ServeForeground) -> None:
    """--port NAME=N listens for the poem named NAME; --port N for the unnamed one."""
    server = serve_foreground(
        "--poem", str(LANTERN), "--poem", f"ledger={LEDGER}", "--port", "ledger=0"
    )
    ports = _serving_lines(server)
    assert set(ports) == {"lantern.txt", "ledger"}, server.log()
    assert ports["lantern.txt"] != ports["ledger"]
    assert fetch(ports["lantern.txt"]) == LANTERN.read_bytes()
    assert fetch(ports["ledger"]) == LEDGER.read_bytes()
    assert "on 2 sockets" in server.wait_for_log(r"INFO: ready: .*\n").group(0)
    assert terminate(server) == 0
    assert_clean_log(server)


def test_foreground_with_only_named_poems_listens_only_on_their_ports(
    serve_foreground: ServeForeground,
) -> None:
    """Every poem named, each with a port: the unnamed port (10000) is not taken."""
    server = serve_foreground(
        "--poem", f"a={LANTERN}", "--poem", f"b={WINTER}", "--port", "a=0", "--port", "b=0"
    )
    ports = _serving_lines(server)
    assert set(ports) == {"a", "b"}, server.log()
    assert fetch(ports["a"]) == LANTERN.read_bytes()
    assert fetch(ports["b"]) == WINTER.read_bytes()
    assert terminate(server) == 0
    assert_clean_log(server)


def test_a_named_poem_without_a_port_is_not_served_and_says_so(
    serve_foreground: ServeForeground,
) -> None:
    """A named poem with neither a socket nor a --port: a warning naming both ways."""
    server = serve_foreground("--poem", str(LANTERN), "--poem", f"quiet={LEDGER}")
    assert set(_serving_lines(server)) == {"lantern.txt"}
    warning = server.wait_for_log(r"WARNING: no socket is named 'quiet'.*\n").group(0)
    assert "--port quiet=N" in warning and "FileDescriptorName=" in warning
    assert terminate(server) == 0


# -- the proxy ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _proxy(start_server: StartServer, upstream_port: int, *args: str, env: dict[str, str] | None = None) -> Server:
    server = start_server(
        "proxy", "--upstream", f"127.0.0.1:{upstream_port}", *LOCAL, *args, env=env
    )
    server.wait_ready()
    return server


def test_proxy_serves_the_upstream_poem_and_keeps_it_when_the_upstream_goes(
    serve_foreground: ServeForeground, start_server: StartServer, notify_socket: NotifySocket
) -> None:
    """Fetched, cached, served; with the upstream gone the cache is served and the log warns."""
    upstream = serve_foreground("--poem", str(LANTERN))
    _, port = upstream.address()
    proxy = _proxy(
        start_server, port, "--refresh", "0.2", env=clean_env(NOTIFY_SOCKET=notify_socket.path)
    )
    ready = notify_socket.wait_for("READY", "1")
    assert ready["STATUS"].startswith(f"Serving the poem of upstream 127.0.0.1:{port} ({LANTERN.stat().st_size} bytes)")
    assert f"INFO: fetched a poem from upstream 127.0.0.1:{port} ({LANTERN.stat().st_size} bytes)" in proxy.log()
    address = proxy.address()
    assert fetch(address) == LANTERN.read_bytes()

    assert terminate(upstream) == 0
    proxy.wait_for_log(rf"WARNING: upstream 127\.0\.0\.1:{port} is unreachable \(connection refused\); still serving the cached poem")
    for _ in range(3):
        assert fetch(address) == LANTERN.read_bytes()
    status = notify_socket.wait_for("STATUS")["STATUS"]
    while "upstream failing" not in status:
        status = notify_socket.wait_for("STATUS")["STATUS"]
    assert "upstream failing: connection refused" in status
    assert terminate(proxy) == 0
    assert_clean_log(proxy)


def test_proxy_with_nothing_cached_closes_clients_until_the_upstream_answers(
    start_server: StartServer, notify_socket: NotifySocket
) -> None:
    """Upstream down from the start: clients are closed with nothing, then served once it is up."""
    port = _free_port()
    proxy = _proxy(start_server, port, env=clean_env(NOTIFY_SOCKET=notify_socket.path))
    status = notify_socket.wait_for("READY", "1")["STATUS"]
    assert status == f"Waiting for a poem from upstream 127.0.0.1:{port}: connection refused; 0 poems served"
    address = proxy.address()
    assert fetch(address) == b""
    proxy.wait_for_log(r"WARNING: no poem to serve yet: closed 1 connection on 127\.0\.0\.1:\d+ without one\n")
    assert f"WARNING: no poem from upstream 127.0.0.1:{port} yet: connection refused; retrying in" in proxy.log()

    upstream = start_server("serve", "--iface", "127.0.0.1", "--port", str(port), "--poem", str(LEDGER))
    upstream.wait_ready()
    proxy.wait_for_log(rf"INFO: fetched a poem from upstream 127\.0\.0\.1:{port} \(\d+ bytes\)")
    assert fetch(address) == LEDGER.read_bytes()
    assert terminate(proxy) == 0
    assert terminate(upstream) == 0
    assert_clean_log(proxy)


def test_sighup_makes_the_proxy_fetch_at_once(
    start_server: StartServer, serve_foreground: ServeForeground, tmp_path: Path
) -> None:
    """SIGHUP fetches now, whatever --refresh says; the new poem is served."""
    path = tmp_path / "poem.txt"
    old = make_poem(path, 2000, seed="old")
    upstream = serve_foreground("--poem", str(path))
    _, port = upstream.address()
    proxy = _proxy(start_server, port, "--refresh", "3600")
    address = proxy.address()
    assert fetch(address) == old

    new = make_poem(tmp_path / "next.txt", 3000, seed="new")
    _replace(path, tmp_path / "next.txt")
    upstream.send_signal(signal.SIGHUP)
    wait_for_count(upstream, READY, 2)
    proxy.send_signal(signal.SIGHUP)
    wait_for_count(proxy, READY, 2)
    assert fetch(address) == new
    assert terminate(proxy) == 0
    assert terminate(upstream) == 0
    assert_clean_log(proxy)

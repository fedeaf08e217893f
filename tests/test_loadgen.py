"""The benchmark's load generator counts what it is there to count.

``bench/loadgen.c`` is what says "no failed or short fetches" for every
server in the benchmark, so it is checked here on its own, against small
servers that misbehave on purpose: a poem one byte short, one byte long,
a reset halfway, a port nobody listens on, and a server that never ends
the poem.  Each connection must be counted once, under the right reason,
and the exit status must say whether anything failed.

It is built with gcc exactly as ``bench/run`` builds it (warnings are
errors), so a warning in it fails here too.  No figure is judged.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import REPO, WAIT

POEM = b"A short poem for the load generator\nand its second line.\n"

#: Connections per run, and how many at once.
POEMS = 24
CONCURRENCY = 4

Behaviour = Callable[[socket.socket], None]


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bench/loadgen.c`` built as ``bench/run`` builds it."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is missing: tools/test installs it, and bench/run needs it")
    binary = tmp_path_factory.mktemp("loadgen") / "loadgen"
    subprocess.run(
        ["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(REPO / "bench" / "loadgen.c")],
        check=True, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    return binary


def serve_whole(conn: socket.socket) -> None:
    conn.sendall(POEM)


def serve_short(conn: socket.socket) -> None:
    conn.sendall(POEM[:-1])


def serve_long(conn: socket.socket) -> None:
    conn.sendall(POEM + b"!")


def serve_half_then_reset(conn: socket.socket) -> None:
    conn.sendall(POEM[: len(POEM) // 2])
    # SO_LINGER on with a zero timeout: close() sends a reset.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def serve_without_end(conn: socket.socket) -> None:
    conn.sendall(POEM)
    # The poem is whole, but no end of stream comes before the client gives up.
    threading.Event().wait(WAIT)


@pytest.fixture
def server() -> Iterator[Callable[[Behaviour], int]]:
    """Start a threaded TCP server on 127.0.0.1 that treats every client with a behaviour; its port."""
    listeners: list[socket.socket] = []

    def start(behaviour: Behaviour) -> int:
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        listeners.append(listener)

        def handle(conn: socket.socket) -> None:
            with conn:
                try:
                    behaviour(conn)
                except OSError:
                    pass  # the client gave up first

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # closed at the end of the test
                    return
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for listener in listeners:
        # accept() blocked in another thread returns only on a shutdown.
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()


def run(loadgen: Path, port: int, *extra: str) -> tuple[int, dict[str, str], str]:
    """Run the load generator; its exit status, its KEY=VALUE line, and its standard error."""
    done = subprocess.run(
        [str(loadgen), "-a", "127.0.0.1", "-p", str(port), "-b", str(len(POEM)),
         "-c", str(CONCURRENCY), "-n", str(POEMS), *extra],
        capture_output=True, text=True, timeout=3 * WAIT, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    pairs = dict(field.split("=", 1) for field in done.stdout.split())
    return done.returncode, pairs, done.stderr


REASONS = ("short", "long", "reset", "refused", "ports", "timeout", "error")


def test_whole_poems_are_counted_and_nothing_fails(loadgen: Path, server: Callable[[Behaviour], int]) -> None:
    status, result, stderr = run(loadgen, server(serve_whole))
    assert status == 0, stderr
    assert result["poems"] == str(POEMS) and result["failures"] == "0", result
    assert all(result[reason] == "0" for reason in REASONS), result
    assert int(result["bytes"]) == POEMS * len(POEM), result


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [(serve_short, "short"), (serve_long, "long"), (serve_half_then_reset, "reset")],
    ids=["short", "long", "reset"],
)
def test_every_bad_fetch_is_a_failure_under_its_reason(
    loadgen: Path, server: Callable[[Behaviour], int], behaviour: Behaviour, reason: str
) -> None:
    status, result, stderr = run(loadgen, server(behaviour))
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["failures"] == str(POEMS), result
    assert result[reason] == str(POEMS), result
    assert reason in stderr, stderr  # the first failures are described


def test_a_port_nobody_listens_on_is_refused(loadgen: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    status, result, stderr = run(loadgen, port)
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["refused"] == str(POEMS), result


def test_a_poem_that_never_ends_is_a_timeout(loadgen: Path, server: Callable[[Behaviour], int]) -> None:
    status, result, stderr = run(loadgen, server(serve_without_end), "-t", "0.5")
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["timeout"] == str(POEMS), result

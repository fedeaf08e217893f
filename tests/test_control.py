"""``fastpoetry reload`` and the control socket: a reload that waits for its outcome and tells it.

Real servers in real processes, asked by the real ``fastpoetry reload``
over a real AF_UNIX socket; the poems are fetched over TCP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    WAIT,
    Server,
    clean_env,
    fetch,
    listening_socket,
    make_poem,
    start_activated,
    terminate,
    wait_until,
)


def reload(control: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``fastpoetry reload --control CONTROL ARGS``, and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "fastpoetry", "reload", "--control", str(control), *args],
        capture_output=True, text=True, timeout=WAIT, env=env or clean_env(), check=False,
    )


def start_reload(control: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fastpoetry", "reload", "--control", str(control), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )


def pending_connections(control: Path) -> int:
    """Connections waiting in the control socket's queue, from /proc/net/unix.

    The server's end of a connection not yet accepted carries the
    listener's path; the listener is the one more line.
    """
    with open("/proc/net/unix") as table:
        return sum(1 for line in table if line.rstrip("\n").endswith(f" {control}")) - 1


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line: {lines}"
    return lines[0]


def test_reload_returns_once_the_new_poem_is_served(serve_foreground, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each reload exits 0, and the very next fetch, with no wait, is the new poem (a 4 MiB one)."""
    poem, control = tmp_path / "poem.txt", tmp_path / "control"
    make_poem(poem, 4 << 20, seed="first")
    server: Server = serve_foreground("--poem", str(poem), "--control", str(control))
    address = server.address()
    for round in range(5):
        new = make_poem(poem, 4 << 20, seed=f"round {round}")
        done = reload(control)
        assert (done.returncode, done.stderr) == (0, "")
        assert fetch(address) == new, f"round {round}: not the new poem right after the reload returned"
    assert f"received a reload request from PID {os.getpid()}" not in server.log()  # the command asked, not pytest
    assert server.log().count("received a reload request from PID") == 5


def test_a_failed_reload_exits_1_names_the_file_and_keeps_the_old_poem(serve_foreground, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An empty poem: exit 1 and one line naming the file; the old poem is still served,
    and putting a good poem back makes the next reload succeed."""
    poem, control = tmp_path / "poem.txt", tmp_path / "control"
    good = make_poem(poem, 3000, seed="good")
    server: Server = serve_foreground("--poem", str(poem), "--control", str(control))
    address = server.address()
    poem.write_bytes(b"")
    done = reload(control)
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line == f"fastpoetry reload: reload failed, still serving the poems loaded before: " \
        f"cannot load a poem from {poem}: the file is empty", line
    assert fetch(address) == good
    fixed = make_poem(poem, 2000, seed="fixed")
    done = reload(control)
    assert (done.returncode, done.stderr) == (0, "")
    assert fetch(address) == fixed
    assert server.process.poll() is None


def test_racing_reloads_each_get_a_reload_of_their_own(serve_foreground, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Eight reloads at once all get an answer, each from a reload that started after it was asked:
    all succeed with a good poem, all fail with a bad one."""
    poem, control = tmp_path / "poem.txt", tmp_path / "control"
    make_poem(poem, 1 << 20)
    server: Server = serve_foreground("--poem", str(poem), "--control", str(control))
    for content, status in ((None, 0), (b"\xff not UTF-8\n", 1)):
        if content is not None:
            poem.write_bytes(content)
        before = server.log().count("received a reload request")
        racers = [start_reload(control) for _ in range(8)]
        results = [(racer.communicate(timeout=WAIT)[1], racer.returncode) for racer in racers]
        assert [code for _, code in results] == [status] * 8, results
        if status:
            assert all("not UTF-8 text" in err for err, _ in results), results
        assert server.log().count("received a reload request") - before == 8


def test_reload_with_workers_succeeds_only_when_every_worker_has_the_new_poem(serve_foreground, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With --workers 2: every fetch after a successful reload is the new poem, whichever
    worker serves it; a poem no worker can load fails the reload and every worker keeps the old."""
    poem, control = tmp_path / "poem.txt", tmp_path / "control"
    make_poem(poem, 100_000, seed="first")
    server: Server = serve_foreground("--poem", str(poem), "--control", str(control), "--workers", "2")
    address = server.address()
    new = make_poem(poem, 200_000, seed="second")
    done = reload(control)
    assert (done.returncode, done.stderr) == (0, "")
    assert {fetch(address) for _ in range(20)} == {new}
    poem.write_bytes(b"")
    done = reload(control)
    assert done.returncode == 1 and "the file is empty" in one_line(done.stderr)
    assert {fetch(address) for _ in range(20)} == {new}
    assert server.log().count("reload failed") >= 2  # each worker says so


def test_proxy_reload_fails_while_the_upstream_is_down_and_succeeds_once_it_is_back(
    start_server, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """The proxy's reload is a fetch: it fails when the upstream does not answer (the cached
    poem stays), and once it does, it succeeds and the new poem is served at once."""
    upstream_socket = listening_socket()
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    old, new = make_poem(first, 5000, seed="old"), make_poem(second, 6000, seed="new")
    host, port = upstream_socket.getsockname()
    upstream = start_activated(start_server, [upstream_socket], "serve", "--poem", str(first))
    upstream.wait_ready()
    control = tmp_path / "control"
    proxy: Server = start_server("proxy", "--upstream", f"{host}:{port}", "--iface", "127.0.0.1", "--port", "0",
                                 "--timeout", "1", "--refresh", "3600", "--control", str(control))
    proxy.wait_ready()
    address = proxy.address()
    assert fetch(address) == old
    assert terminate(upstream) == 0
    # The test holds the upstream's socket, as systemd would: a fetch is
    # taken into its queue and never answered, and times out.
    done = reload(control)
    assert done.returncode == 1
    assert f"upstream {host}:{port}" in one_line(done.stderr), done.stderr
    assert fetch(address) == old
    upstream = start_activated(start_server, [upstream_socket], "serve", "--poem", str(second))
    upstream.wait_ready()
    done = reload(control)
    assert (done.returncode, done.stderr) == (0, "")
    assert fetch(address) == new
    upstream_socket.close()


def test_a_reload_during_shutdown_is_answered_failed(serve_foreground, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A reload asked while the server waits for a poem in flight to finish fails at once, saying why."""
    poem, control = tmp_path / "poem.txt", tmp_path / "control"
    make_poem(poem, 8 << 20)
    server: Server = serve_foreground("--poem", str(poem), "--control", str(control), "--shutdown-timeout", "60")
    with socket.create_connection(server.address()) as stalled:  # never reads: its poem stays in flight
        stalled.recv(1, socket.MSG_PEEK)  # the server has begun to send it
        server.send_signal(signal.SIGTERM)
        server.wait_for_log(r"shutting down: accepting no more clients, waiting up to 60 s for 1 poem in flight")
        done = reload(control)
        assert done.returncode == 1
        assert "the server is shutting down" in one_line(done.stderr)
        stalled.close()
    assert server.wait() == 0
    assert not control.exists(), "the control socket outlived the server"


def test_no_answer_is_one_line_and_exit_1_and_a_request_given_up_is_dropped(  # type: ignore[no-untyped-def]
    serve_foreground, tmp_path: Path
) -> None:
    """A server that does not answer (stopped): --timeout gives up with one line; so does a
    SIGTERM. Requests whose clients have given up (systemd kills an ExecReload= that outlasts
    TimeoutStartSec=) are not carried out once the server gets to them, so "failed" stays true:
    the old poem is still served."""
    poem, control = tmp_path / "poem.txt", tmp_path / "control"
    old = make_poem(poem, 1000, seed="old")
    server: Server = serve_foreground("--poem", str(poem), "--control", str(control))
    server.send_signal(signal.SIGSTOP)
    new = make_poem(poem, 1500, seed="new")
    try:
        done = reload(control, "--timeout", "0.5")
        assert done.returncode == 1
        assert "did not answer within 0.5 s" in one_line(done.stderr)
        queued = pending_connections(control)
        waiting = start_reload(control)
        # Connected, so waiting for the answer (its SIGTERM handler is set
        # before it connects): one more connection in the stopped server's queue.
        wait_until(lambda: pending_connections(control) > queued, "the reload command's connection")
        waiting.send_signal(signal.SIGTERM)
        _, stderr = waiting.communicate(timeout=WAIT)
        assert waiting.returncode == 1
        assert "stopped by SIGTERM" in one_line(stderr) and "drops the request" in stderr
    finally:
        server.send_signal(signal.SIGCONT)
    server.wait_for_log(r"(?s)(not reloading for a reload request from PID \d+ \(uid \d+\): it has given up waiting.*){2}")
    address = server.address()
    assert fetch(address) == old
    assert "loaded a poem from" not in server.log().split("given up waiting", 1)[1]
    done = reload(control)
    assert (done.returncode, done.stderr) == (0, "")
    assert fetch(address) == new


def test_no_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Nothing at the path, or nothing listening there: one line naming the path, exit 1;
    no path at all and no RUNTIME_DIRECTORY: a usage error."""
    done = reload(tmp_path / "missing")
    assert done.returncode == 1 and f"no server at {tmp_path / 'missing'}" in one_line(done.stderr)
    dead = tmp_path / "dead"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dead))
    done = reload(dead)
    assert done.returncode == 1 and "nothing listens there" in one_line(done.stderr)
    done = subprocess.run([sys.executable, "-m", "fastpoetry", "reload"], capture_output=True, text=True,
                          timeout=WAIT, env=clean_env(), check=False)
    assert done.returncode == 2 and "RUNTIME_DIRECTORY" in one_line(done.stderr)


def test_runtime_directory_is_the_default_for_server_and_reload(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Under a unit with RuntimeDirectory=, both find the socket without --control, as ExecReload= does."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    poem = tmp_path / "poem.txt"
    make_poem(poem, 1000, seed="before")
    env = clean_env(RUNTIME_DIRECTORY=str(runtime))
    server: Server = start_server("serve", "--iface", "127.0.0.1", "--port", "0", "--poem", str(poem), env=env)
    server.wait_ready()
    assert (runtime / "control").is_socket()
    new = make_poem(poem, 1200, seed="after")
    done = subprocess.run([sys.executable, "-m", "fastpoetry", "reload"], capture_output=True, text=True,
                          timeout=WAIT, env=env, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert fetch(server.address()) == new


@pytest.mark.parametrize("case", ["missing folder", "not a socket", "another server"])
def test_an_unusable_control_socket_stops_the_start_with_one_line(  # type: ignore[no-untyped-def]
    start_server, serve_foreground, tmp_path: Path, case: str
) -> None:
    """The control socket cannot be made: exit 1 and one line naming it, before READY=1."""
    poem = tmp_path / "poem.txt"
    make_poem(poem, 1000)
    control = tmp_path / "control"
    expected = {"missing folder": "no such file or directory", "not a socket": "not a socket",
                "another server": "another server listens on it"}[case]
    if case == "missing folder":
        control = tmp_path / "nowhere" / "control"
    elif case == "not a socket":
        control.write_text("mine\n")
    else:
        serve_foreground("--poem", str(poem), "--control", str(control))
    server: Server = start_server("serve", "--iface", "127.0.0.1", "--port", "0", "--poem", str(poem),
                                  "--control", str(control))
    assert server.wait() == 1
    errors = [line for line in server.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(control) in errors[0] and expected in errors[0], server.log()
    if case == "not a socket":
        assert control.read_text() == "mine\n"


def test_a_stale_control_socket_is_replaced(serve_foreground, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A socket file left by a server that was killed is taken over by the next one."""
    poem, control = tmp_path / "poem.txt", tmp_path / "control"
    make_poem(poem, 1000)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(control))
    serve_foreground("--poem", str(poem), "--control", str(control))
    done = reload(control)
    assert (done.returncode, done.stderr) == (0, "")

"""ProxyService in-process, against real upstream servers.

The upstream is a real ``fastpoetry serve`` process, or a poetry server of
the test's own in its event loop (:class:`Upstream`) that can go down, come
up, and misbehave: never send, send part of a poem and reset, send too much
or send what is not UTF-8.  The clock is trio's real one; waits are hang
guards only (``WAIT``): tests assert what happened, never how fast.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from helpers import WAIT, fetch, make_poem, wait_until_async
from fastpoetry import proxy as proxy_module
from fastpoetry.proxy import ProxyService

#: What the test's own upstream serves when all is well.
POEM = "The ferry leaves at dusk; the lamps, at dawn. — ☾\n".encode() * 40

#: Long enough that a test passes only if the poem came from a retry.
NEVER = 3600.0

# SO_LINGER on, with a zero timeout: close() resets the connection.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)

#: What the test's upstream does with one client.
Behaviour = Callable[[trio.socket.SocketType], Awaitable[None]]


# -- the test's own upstream ------------------------------------------------


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


def sends(data: bytes) -> Behaviour:
    """Send ``data``, then close: a whole poem, as far as the client can tell."""

    async def behaviour(conn: trio.socket.SocketType) -> None:
        await send_all(conn, data)

    return behaviour


def resets_after(data: bytes) -> Behaviour:
    """Send ``data``, then reset: a poem abandoned part-way."""

    async def behaviour(conn: trio.socket.SocketType) -> None:
        await send_all(conn, data)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)

    return behaviour


def stalls_after(data: bytes) -> Behaviour:
    """Send ``data`` (maybe nothing), then nothing more until the client closes."""

    async def behaviour(conn: trio.socket.SocketType) -> None:
        await send_all(conn, data)
        while await conn.recv(4096):
            pass

    return behaviour


class Upstream:
    """A poetry server in the test's event loop, on a port it keeps.

    A placeholder socket bound with SO_REUSEPORT (and never listening) holds
    the port from first to last: while the upstream is down a connection is
    refused, and no other program can take the port meanwhile.  :meth:`up`
    binds a listener beside it; :attr:`behaviour` says what each client gets.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._holder.bind(("127.0.0.1", 0))
        self.port: int = self._holder.getsockname()[1]
        self.behaviour: Behaviour = sends(POEM)
        #: Clients accepted so far; clients connected now; the most at once.
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self._serving: trio.CancelScope | None = None
        self._closed = trio.Event()

    def close(self) -> None:
        self._holder.close()

    async def up(self) -> None:
        """Listen; returns once connections are accepted."""
        listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._closed = trio.Event()
        self._serving = await self._nursery.start(self._serve, listener)

    async def down(self) -> None:
        """Stop listening and drop the clients; returns once connecting is refused."""
        assert self._serving is not None
        self._serving.cancel()
        await self._closed.wait()
        self._serving = None

    async def _serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                async with trio.open_nursery() as handlers:
                    while True:
                        conn, _ = await listener.accept()
                        handlers.start_soon(self._handle, conn, self.behaviour)
        finally:
            listener.close()
            self._closed.set()

    async def _handle(self, conn: trio.socket.SocketType, behaviour: Behaviour) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            with conn:
                try:
                    await behaviour(conn)
                except OSError:
                    pass  # the proxy hung up first: more than it takes
                except BaseException:
                    # Cut short (the upstream goes down): a reset, as a
                    # real server does, never an end that looks whole.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                    raise
        finally:
            self.open -= 1


# -- fixtures and helpers ---------------------------------------------------


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[Upstream]:
    """The test's own upstream, down until the test calls ``up()``."""
    server = Upstream(nursery)
    yield server
    server.close()


@pytest.fixture
def proxy_log(poetry_log: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The package's records at DEBUG (conftest's poetry_log), under this module's name for them."""
    return poetry_log


def records(
    caplog: pytest.LogCaptureFixture, level: int | None = None, pattern: str = ""
) -> list[logging.LogRecord]:
    """The proxy's records at ``level`` (any, if None) whose message matches ``pattern``."""
    return [
        record
        for record in caplog.records
        if record.name == "fastpoetry.proxy"
        and (level is None or record.levelno == level)
        and re.search(pattern, record.getMessage())
    ]


@asynccontextmanager
async def running(service: ProxyService) -> AsyncIterator[ProxyService]:
    """``service`` started in a nursery of its own; stopped on the way out.

    The nursery must exit once the service has stopped: a task left behind
    would keep it open until the hang guard, and fails the test.
    """
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await service.start(nursery)
        try:
            yield service
        finally:
            with trio.fail_after(WAIT):
                await service.stop()
            nursery.cancel_scope.deadline = trio.current_time() + WAIT
    assert not nursery.cancel_scope.cancelled_caught, "a task of the proxy outlived stop()"
    assert not service.running


def local_proxy(port: int, **options: object) -> ProxyService:
    settings: dict[str, object] = {"timeout": WAIT, "refresh": NEVER}
    settings.update(options)
    return ProxyService("127.0.0.1", port, **settings)  # type: ignore[arg-type]


# -- a real upstream: fastpoetry serve --------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_start_caches_the_exact_poem_of_a_real_server(
    serve_foreground, tmp_path: Path, proxy_log: pytest.LogCaptureFixture, host: str  # type: ignore[no-untyped-def]
) -> None:
    """Started against a running server (by address, or as localhost), the proxy holds its poem byte for byte."""
    # Larger than one read, so that the poem arrives in pieces.
    expected = make_poem(tmp_path / "poem.txt", 300_000)
    server = serve_foreground("--poem", str(tmp_path / "poem.txt"))
    _, port = server.address()
    service = ProxyService(host, port, timeout=WAIT, refresh=NEVER)
    async with running(service):
        assert service.poem == expected
        assert service.fetched_at is not None
        assert service.last_error is None
        assert service.failures == 0
    [info] = records(proxy_log, logging.INFO)
    assert info.getMessage() == f"fetched a poem from upstream {host}:{port} ({len(expected)} bytes)"
    assert (info.UPSTREAM, info.BYTES) == (f"{host}:{port}", len(expected))  # type: ignore[attr-defined]
    assert records(proxy_log, logging.WARNING) == []


async def test_refresh_caches_the_poem_of_a_reloaded_server(
    serve_foreground, tmp_path: Path, proxy_log: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    """After the upstream reloads a new poem, refresh() returns True and the proxy holds the new one."""
    path = tmp_path / "poem.txt"
    old = make_poem(path, 2000, seed="old")
    server = serve_foreground("--poem", str(path))
    address = server.address()
    async with running(local_proxy(address[1])) as service:
        assert service.poem == old
        new = make_poem(path, 3000, seed="new")
        server.send_signal(signal.SIGHUP)
        with trio.fail_after(WAIT):
            while await trio.to_thread.run_sync(fetch, address) != new:
                await trio.sleep(0.01)
        assert await service.refresh() is True
        assert service.poem == new
    fetched = [r.getMessage() for r in records(proxy_log, logging.INFO, "fetched a poem")]
    assert fetched == [
        f"fetched a poem from upstream 127.0.0.1:{address[1]} (2000 bytes)",
        f"fetched a poem from upstream 127.0.0.1:{address[1]} (3000 bytes)",
    ]


# -- the upstream coming and going ------------------------------------------


async def test_refresh_of_an_unchanged_poem_succeeds_quietly(
    upstream: Upstream, proxy_log: pytest.LogCaptureFixture
) -> None:
    """The same poem again: refresh() is True, fetched_at moves on, and only DEBUG says so."""
    await upstream.up()
    async with running(local_proxy(upstream.port)) as service:
        first = service.fetched_at
        assert await service.refresh() is True
        assert service.poem == POEM
        assert service.fetched_at is not None and first is not None
        assert service.fetched_at >= first
    assert len(records(proxy_log, logging.INFO)) == 1
    assert len(records(proxy_log, logging.DEBUG, "sent the same poem again")) == 1


async def test_start_with_the_upstream_down_serves_nothing_until_it_comes_up(
    upstream: Upstream, proxy_log: pytest.LogCaptureFixture
) -> None:
    """Start does not raise; the poem is empty and a warning says why; the poem
    comes by a retry soon after the upstream does, long before a refresh period."""
    async with running(local_proxy(upstream.port)) as service:
        assert service.running
        assert service.poem == b""
        assert service.fetched_at is None
        assert service.last_error == "connection refused"
        [warning] = records(proxy_log, logging.WARNING)
        assert warning.getMessage() == (
            f"no poem from upstream 127.0.0.1:{upstream.port} yet: connection refused; retrying in 1 s"
        )
        await upstream.up()
        await wait_until_async(lambda: service.poem == POEM)
        assert service.last_error is None
        assert service.failures == 0
    assert len(records(proxy_log, logging.WARNING)) == 1
    assert len(records(proxy_log, logging.INFO, r"recovered after \d+ failed fetch(es)? over \d+ s$")) == 1
    assert len(records(proxy_log, logging.INFO, "fetched a poem")) == 1


async def test_retries_back_off_up_to_the_refresh_period(
    upstream: Upstream, proxy_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While nothing is cached, each retry waits twice as long as the last, up to refresh."""
    monkeypatch.setattr(proxy_module, "FIRST_RETRY", 0.01)
    async with running(local_proxy(upstream.port, refresh=0.08)) as service:
        await wait_until_async(lambda: service.failures >= 6)
    delays = [
        float(re.search(r"retrying in (\S+) s", r.getMessage()).group(1))  # type: ignore[union-attr]
        for r in records(proxy_log, None, "^no poem from upstream")
    ]
    assert delays[:6] == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]


async def test_a_run_of_failures_keeps_the_poem_warns_once_and_logs_the_recovery(
    upstream: Upstream, proxy_log: pytest.LogCaptureFixture
) -> None:
    """Upstream down after a success: the old poem stays, one WARNING for many failed
    refreshes (the rest at DEBUG), and one INFO when the upstream is back."""
    await upstream.up()
    async with running(local_proxy(upstream.port, refresh=0.05)) as service:
        await upstream.down()
        await wait_until_async(lambda: service.failures >= 5)
        assert service.poem == POEM
        assert service.last_error == "connection refused"
        [warning] = records(proxy_log, logging.WARNING)
        assert re.fullmatch(
            rf"upstream 127\.0\.0\.1:{upstream.port} is unreachable \(connection refused\); "
            rf"still serving the cached poem \({len(POEM)} bytes, fetched \d+ s ago\)",
            warning.getMessage(),
        ), warning.getMessage()
        assert len(records(proxy_log, logging.DEBUG, "is unreachable")) >= 4
        await upstream.up()
        await wait_until_async(lambda: service.failures == 0)
        assert service.poem == POEM
        assert service.last_error is None
    assert len(records(proxy_log, logging.WARNING)) == 1
    [recovered] = records(proxy_log, logging.INFO, "recovered")
    assert re.fullmatch(
        rf"upstream 127\.0\.0\.1:{upstream.port} recovered after \d+ failed fetches over \d+ s",
        recovered.getMessage(),
    ), recovered.getMessage()
    # The same poem came back: "fetched a poem" was said once, at start.
    assert len(records(proxy_log, logging.INFO, "fetched a poem")) == 1


async def test_a_long_run_of_failures_warns_again_after_the_interval(
    upstream: Upstream, proxy_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once WARNING_INTERVAL has passed since the last warning, the next failure warns again."""
    monkeypatch.setattr(proxy_module, "WARNING_INTERVAL", 0.0)
    await upstream.up()
    async with running(local_proxy(upstream.port, refresh=0.02)) as service:
        await upstream.down()
        await wait_until_async(lambda: service.failures >= 3)
        assert len(records(proxy_log, logging.WARNING, "is unreachable")) == service.failures


async def test_an_explicit_refresh_always_reports_its_failure(
    upstream: Upstream, proxy_log: pytest.LogCaptureFixture
) -> None:
    """refresh() (SIGHUP) that fails returns False and warns, even within a run of failures."""
    await upstream.up()
    async with running(local_proxy(upstream.port)) as service:
        await upstream.down()
        for _ in range(3):
            assert await service.refresh() is False
        assert service.poem == POEM
        assert service.failures == 3
    assert len(records(proxy_log, logging.WARNING, "is unreachable")) == 3


# -- upstreams that misbehave -----------------------------------------------

#: A max_size that POEM fits in, for the test of a reply too big.
MAX_SIZE = 4096

#: A timeout for the upstreams that never finish; the others get WAIT, so
#: that a loaded machine cannot turn their failure into a timeout.
SHORT = 0.2

TOO_BIG = rf"too big for a poem: more than the largest poem allowed \({MAX_SIZE} bytes\)"

#: Name: what the upstream does, the reason the proxy gives, its timeout.
BAD_UPSTREAMS: dict[str, tuple[Behaviour, str, float]] = {
    "reset-part-way": (resets_after(POEM[: len(POEM) // 2]), r"connection reset after \d+ bytes", WAIT),
    "too-big": (sends(b"x" * (MAX_SIZE + 1)), TOO_BIG, WAIT),
    "far-too-big": (sends(b"x" * (4 * 1024 * 1024)), TOO_BIG, WAIT),
    "latin-1": (sends("ok\ncafé\n".encode("latin-1")), r"not UTF-8 text \(byte 0xe9 at offset 6\)", WAIT),
    "empty": (sends(b""), r"the reply is empty", WAIT),
    "silent": (stalls_after(b""), r"timed out after 0\.2 s \(0 bytes received\)", SHORT),
    "part-then-silent": (stalls_after(POEM[:100]), r"timed out after 0\.2 s \(\d+ bytes? received\)", SHORT),
}


@pytest.mark.parametrize("name", list(BAD_UPSTREAMS))
async def test_a_bad_reply_is_never_cached(
    upstream: Upstream, proxy_log: pytest.LogCaptureFixture, name: str
) -> None:
    """A reset, a timeout, a reply too big, empty or not UTF-8 fails the fetch: at start
    nothing is cached; later the cached poem stays."""
    behaviour, reason, timeout = BAD_UPSTREAMS[name]
    await upstream.up()
    upstream.behaviour = behaviour
    async with running(local_proxy(upstream.port, timeout=timeout, max_size=MAX_SIZE)) as service:
        assert service.poem == b""
        assert service.last_error is not None and re.fullmatch(reason, service.last_error), service.last_error
        [warning] = records(proxy_log, logging.WARNING)
        assert re.fullmatch(
            rf"no poem from upstream 127\.0\.0\.1:{upstream.port} yet: {reason}; retrying in 1 s",
            warning.getMessage(),
        ), warning.getMessage()

        upstream.behaviour = sends(POEM)
        # A good fetch must not be cut short by a loaded machine.
        service.timeout = WAIT
        assert await service.refresh() is True
        assert service.poem == POEM

        upstream.behaviour = behaviour
        service.timeout = timeout
        assert await service.refresh() is False
        assert service.poem == POEM
        assert service.last_error is not None and re.fullmatch(reason, service.last_error), service.last_error
        warning = records(proxy_log, logging.WARNING)[-1]
        assert re.fullmatch(
            rf"upstream 127\.0\.0\.1:{upstream.port} sent no usable poem \({reason}\); "
            rf"still serving the cached poem \({len(POEM)} bytes, fetched \d+ s ago\)",
            warning.getMessage(),
        ), warning.getMessage()


async def test_a_poem_of_exactly_max_size_is_taken(upstream: Upstream) -> None:
    """max_size is inclusive, as for a poem file."""
    await upstream.up()
    async with running(local_proxy(upstream.port, max_size=len(POEM))) as service:
        assert service.poem == POEM


async def test_a_name_that_does_not_resolve_is_a_failure() -> None:
    """An upstream name with no address: refresh() is False and says it cannot resolve."""
    service = ProxyService("nonexistent.invalid", 7, timeout=WAIT, refresh=NEVER)
    assert await service.refresh() is False
    assert service.poem == b""
    assert service.last_error is not None
    assert service.last_error.startswith("cannot resolve the host name ("), service.last_error


async def test_a_name_that_cannot_be_a_host_name_is_a_failure_not_a_crash() -> None:
    """A label over 63 characters cannot even be encoded for DNS (IDNA raises UnicodeError)."""
    host = "x" * 64 + ".invalid"
    service = ProxyService(host, 7, timeout=WAIT, refresh=NEVER)
    assert await service.refresh() is False
    assert service.last_error == "cannot resolve the host name (not a valid host name)"


# -- the service itself -----------------------------------------------------


async def test_stop_ends_a_fetch_in_progress(upstream: Upstream) -> None:
    """stop() during a fetch that would take long abandons it and closes its
    connection; no task is left, the poem stays."""
    await upstream.up()
    async with running(local_proxy(upstream.port, refresh=0.01)) as service:
        upstream.behaviour = stalls_after(b"")
        service.timeout = 10 * WAIT
        await wait_until_async(lambda: upstream.open > 0)
    assert service.poem == POEM
    await wait_until_async(lambda: upstream.open == 0)


async def test_only_one_fetch_runs_at_a_time(upstream: Upstream) -> None:
    """refresh() calls that come together, and the refresh loop, fetch one after the other."""
    await upstream.up()
    async with running(local_proxy(upstream.port, refresh=0.01)) as service:
        results: list[bool] = []

        async def refresh() -> None:
            results.append(await service.refresh())

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(refresh)
    assert results == [True] * 5
    assert upstream.most_open == 1


@pytest.mark.parametrize(
    ("host", "label"),
    [("127.0.0.1", "127.0.0.1:7"), ("poems.example", "poems.example:7"), ("::1", "[::1]:7")],
)
def test_label_is_host_and_port(host: str, label: str) -> None:
    """label names the upstream as HOST:PORT, an IPv6 address in brackets."""
    service = ProxyService(host, 7, timeout=1, refresh=1)
    assert service.label == label
    assert service.name == "proxy"


@pytest.mark.parametrize(("timeout", "refresh"), [(0, 1), (1, 0), (-1, 1), (1, float("nan"))])
def test_timeout_and_refresh_must_be_positive(timeout: float, refresh: float) -> None:
    with pytest.raises(ValueError):
        ProxyService("127.0.0.1", 7, timeout=timeout, refresh=refresh)

"""fetch.py in-process: fetch_poem and its helpers over real loopback sockets.

The servers are the test's own, in its event loop (trio sockets), so each
can do exactly one thing to the client: send a poem and close, close at
once, reset part-way, stall, or not answer at all (a full accept queue).
Nothing here looks a name up for real: where a name must be resolved, the
test installs its own resolver for trio (``set_custom_hostname_resolver``),
which also proves that ``localhost`` is never looked up.  Every wait is a
hang guard (``WAIT``); no test asserts how fast anything is.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio

from helpers import WAIT, has_ipv6_loopback, needs_ipv6
from fastpoetry import fetch
from fastpoetry.phrases import count

POEM = "The ferry leaves at dusk; the lamps, at dawn. — ☾\n".encode() * 40

# SO_LINGER on, with a zero timeout: close() resets the connection.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)

Behaviour = Callable[[trio.socket.SocketType], Awaitable[None]]


# -- the test's own servers --------------------------------------------------------


async def send_all(conn: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await conn.send(view) :]


def sends(data: bytes) -> Behaviour:
    """Send ``data``, then close cleanly: a whole poem."""

    async def behaviour(conn: trio.socket.SocketType) -> None:
        await send_all(conn, data)

    return behaviour


def resets_after(data: bytes, transfer: fetch.Transfer) -> Behaviour:
    """Send ``data``, wait until the client has all of it, then reset.

    Waiting makes the outcome exact: the client has counted every byte
    sent before the reset reaches it.
    """

    async def behaviour(conn: trio.socket.SocketType) -> None:
        await send_all(conn, data)
        while transfer.received < len(data):
            await trio.sleep(0.001)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)

    return behaviour


class Stall:
    """Send ``data`` (maybe nothing), then nothing more until the client closes."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        #: Set once the client has closed its end (an end of stream arrived).
        self.client_closed = trio.Event()

    async def __call__(self, conn: trio.socket.SocketType) -> None:
        await send_all(conn, self.data)
        while await conn.recv(4096):
            pass
        self.client_closed.set()


class Server:
    """A listener in the test's event loop; each client gets ``behaviour``."""

    def __init__(self, listener: trio.socket.SocketType, behaviour: Behaviour) -> None:
        self.listener = listener
        self.behaviour = behaviour
        self.port: int = listener.getsockname()[1]
        #: The peer address of every client accepted, in order.
        self.peers: list[Any] = []

    async def serve(self) -> None:
        async with trio.open_nursery() as handlers:
            while True:
                conn, peer = await self.listener.accept()
                self.peers.append(peer)
                handlers.start_soon(self._handle, conn)

    async def _handle(self, conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                await self.behaviour(conn)
            except OSError:
                pass  # the client went away first: not the server's business


@asynccontextmanager
async def serving(
    behaviour: Behaviour, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Server]:
    """Listen on ``host``:``port`` (a free one by default) until the block ends."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with trio.socket.from_stdlib_socket(_bind(family, host, port)) as listener:
        listener.listen(16)
        server = Server(listener, behaviour)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            yield server
            nursery.cancel_scope.cancel()


def _bind(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # REUSEADDR: a port in TIME_WAIT from an earlier test may be bound;
        # REUSEPORT: a test may listen beside a holder of the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def port_free_on_both() -> int:
    """A port free on 127.0.0.1 and, where the host has it, on ::1 (tried, not kept)."""
    for _ in range(50):
        with _bind(socket.AF_INET, "127.0.0.1", 0) as v4:
            port = v4.getsockname()[1]
            if not has_ipv6_loopback():
                return port
            try:
                _bind(socket.AF_INET6, "::1", port).close()
            except OSError:
                continue  # taken on ::1: another
            return port
    raise AssertionError("no port is free on both 127.0.0.1 and ::1")


@contextmanager
def refusing(host: str = "127.0.0.1", port: int = 0) -> Any:
    """A port bound and never listened on: connecting to it is refused.

    Holding it keeps any other program from listening there meanwhile.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _bind(family, host, port) as holder:
        yield holder.getsockname()[1]


@contextmanager
def not_answering(port: int = 0) -> Any:
    """A listener on 127.0.0.1 whose accept queue is full: a connect there hangs.

    With a backlog of 0 the queue holds one connection; the kernel drops
    the SYN of every further one, which then waits for ever (retrying).
    """
    with _bind(socket.AF_INET, "127.0.0.1", port) as listener:
        listener.listen(0)
        with socket.create_connection(listener.getsockname(), timeout=WAIT):
            yield listener.getsockname()[1]


class Resolver(trio.abc.HostnameResolver):
    """A resolver for trio that answers from ``names`` and records every question."""

    def __init__(self, names: dict[bytes, list[str]] | None = None) -> None:
        self.names = names or {}
        self.asked: list[bytes] = []

    async def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> Any:
        self.asked.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address, port, 0, 0) if ":" in address else (address, port),
            )
            for address in self.names[host]
        ]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise AssertionError("fetch never asks for a name")


@pytest.fixture
async def resolver() -> Any:
    """A :class:`Resolver` installed for this test's trio run."""
    installed = Resolver()
    previous = trio.socket.set_custom_hostname_resolver(installed)
    yield installed
    trio.socket.set_custom_hostname_resolver(previous)


# -- a whole poem ------------------------------------------------------------------


async def test_a_whole_poem_is_returned_and_counted() -> None:
    transfer = fetch.Transfer()
    with trio.fail_after(WAIT):
        async with serving(sends(POEM)) as server:
            poem = await fetch.fetch_poem("127.0.0.1", server.port, len(POEM) * 2, transfer)
    assert poem == POEM
    assert transfer.connected
    assert transfer.received == len(POEM)


async def test_a_poem_larger_than_one_read_comes_whole() -> None:
    big = POEM * (3 * fetch.RECEIVE_SIZE // len(POEM) + 1)
    assert len(big) > 3 * fetch.RECEIVE_SIZE
    with trio.fail_after(WAIT):
        async with serving(sends(big)) as server:
            assert await fetch.fetch_poem("127.0.0.1", server.port, len(big), fetch.Transfer()) == big


async def test_a_poem_of_exactly_the_limit_is_returned_whole() -> None:
    with trio.fail_after(WAIT):
        async with serving(sends(POEM)) as server:
            assert await fetch.fetch_poem("127.0.0.1", server.port, len(POEM), fetch.Transfer()) == POEM


async def test_at_most_one_byte_over_the_limit_is_read() -> None:
    """A longer reply is cut at limit + 1 bytes: the caller sees it is too long."""
    transfer = fetch.Transfer()
    limit = 100
    with trio.fail_after(WAIT):
        async with serving(sends(POEM)) as server:
            reply = await fetch.fetch_poem("127.0.0.1", server.port, limit, transfer)
    assert reply == POEM[: limit + 1]
    assert transfer.received == limit + 1


async def test_an_empty_reply_is_returned_as_it_is() -> None:
    transfer = fetch.Transfer()
    with trio.fail_after(WAIT):
        async with serving(sends(b"")) as server:
            assert await fetch.fetch_poem("127.0.0.1", server.port, 1000, transfer) == b""
    assert transfer.connected
    assert transfer.received == 0


def sends_in_two(first: bytes, rest: bytes, transfer: fetch.Transfer) -> Behaviour:
    """Send ``first``, wait until the client has all of it, then ``rest`` and close."""

    async def behaviour(conn: trio.socket.SocketType) -> None:
        await send_all(conn, first)
        while transfer.received < len(first):
            await trio.sleep(0.001)
        await send_all(conn, rest)

    return behaviour


async def test_a_reply_over_the_limit_is_seen_even_when_the_limit_came_first() -> None:
    """Exactly ``limit`` bytes, then more: the one byte over must still be read."""
    transfer = fetch.Transfer()
    limit = 100
    with trio.fail_after(WAIT):
        async with serving(sends_in_two(POEM[:limit], POEM[limit:], transfer)) as server:
            reply = await fetch.fetch_poem("127.0.0.1", server.port, limit, transfer)
    assert reply == POEM[: limit + 1]


async def test_a_poem_of_exactly_the_limit_still_needs_a_clean_end() -> None:
    transfer = fetch.Transfer()
    with trio.fail_after(WAIT):
        async with serving(resets_after(POEM, transfer)) as server:
            with pytest.raises(fetch.ReceiveError) as caught:
                await fetch.fetch_poem("127.0.0.1", server.port, len(POEM), transfer)
    assert caught.value.received == len(POEM)


# -- a poem cut off ----------------------------------------------------------------


async def test_a_reset_part_way_is_a_receive_error_saying_how_much_came() -> None:
    transfer = fetch.Transfer()
    part = POEM[:333]
    with trio.fail_after(WAIT):
        async with serving(resets_after(part, transfer)) as server:
            with pytest.raises(fetch.ReceiveError) as caught:
                await fetch.fetch_poem("127.0.0.1", server.port, len(POEM), transfer)
    assert caught.value.reason == "connection reset"
    assert caught.value.received == len(part) == transfer.received
    assert str(caught.value) == f"connection reset after {len(part)} bytes"
    assert transfer.connected


def open_descriptors() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


async def test_the_connection_is_closed_when_the_poem_is_cut_off() -> None:
    """Closed by fetch_poem itself: the error (and its traceback) is still held here."""
    transfer = fetch.Transfer()
    with trio.fail_after(WAIT):
        async with serving(resets_after(POEM[:10], transfer)):
            pass  # (a first server, so that whatever serving() opens once is open already)
        before = open_descriptors()
        async with serving(resets_after(POEM[:10], transfer)) as server:
            with pytest.raises(fetch.ReceiveError) as caught:
                await fetch.fetch_poem("127.0.0.1", server.port, len(POEM), transfer)
    assert caught.value.__traceback__ is not None
    assert open_descriptors() == before


async def test_a_reset_before_any_byte_is_a_receive_error_after_0_bytes() -> None:
    transfer = fetch.Transfer()
    with trio.fail_after(WAIT):
        async with serving(resets_after(b"", transfer)) as server:
            with pytest.raises(fetch.ReceiveError) as caught:
                await fetch.fetch_poem("127.0.0.1", server.port, len(POEM), transfer)
    assert str(caught.value) == "connection reset after 0 bytes"
    assert caught.value.received == 0
    assert transfer.connected  # it was reached: not a ConnectError


# -- connecting fails --------------------------------------------------------------


async def test_connection_refused_is_a_connect_error_in_lower_case() -> None:
    transfer = fetch.Transfer()
    with trio.fail_after(WAIT), refusing() as port:
        with pytest.raises(fetch.ConnectError) as caught:
            await fetch.fetch_poem("127.0.0.1", port, 1000, transfer)
    assert caught.value.reasons == ["connection refused"]
    assert caught.value.unresolved is None
    assert str(caught.value) == "connection refused"  # no address repeated
    assert not transfer.connected


async def test_a_name_that_does_not_resolve_says_why(resolver: Resolver) -> None:
    with trio.fail_after(WAIT):
        with pytest.raises(fetch.ConnectError) as caught:
            await fetch.fetch_poem("poems.invalid", 17, 1000, fetch.Transfer())
    assert resolver.asked == [b"poems.invalid"]
    assert caught.value.unresolved == "name or service not known"
    assert caught.value.reasons == []
    assert str(caught.value) == "name or service not known"


@pytest.mark.parametrize("host", ["a..b", "a" * 64 + ".example"])
async def test_a_name_that_cannot_be_a_host_name_is_a_connect_error(
    resolver: Resolver, host: str
) -> None:
    with trio.fail_after(WAIT):
        with pytest.raises(fetch.ConnectError) as caught:
            await fetch.fetch_poem(host, 17, 1000, fetch.Transfer())
    assert caught.value.unresolved == "not a valid host name"
    assert str(caught.value) == "not a valid host name"
    assert resolver.asked == []


async def test_a_name_whose_addresses_all_refuse_says_it_once(resolver: Resolver) -> None:
    """open_tcp_stream's group of failures becomes each reason once."""
    with trio.fail_after(WAIT), refusing() as port:
        # Two addresses of the same host, both refused.
        resolver.names[b"poems.test"] = ["127.0.0.1", "127.0.0.1"]
        with pytest.raises(fetch.ConnectError) as caught:
            await fetch.fetch_poem("poems.test", port, 1000, fetch.Transfer())
    assert caught.value.reasons == ["connection refused"]
    assert str(caught.value) == "connection refused"


async def test_a_name_whose_addresses_fail_differently_says_each_reason(
    resolver: Resolver,
) -> None:
    # TCP to the broadcast address fails at once: ENETUNREACH.
    with trio.fail_after(WAIT), refusing() as port:
        resolver.names[b"poems.test"] = ["127.0.0.1", "255.255.255.255"]
        with pytest.raises(fetch.ConnectError) as caught:
            await fetch.fetch_poem("poems.test", port, 1000, fetch.Transfer())
    assert caught.value.reasons == ["connection refused", "network is unreachable"]
    assert str(caught.value) == "connection refused, network is unreachable"


async def test_a_name_resolved_by_the_resolver_is_fetched_from(resolver: Resolver) -> None:
    with trio.fail_after(WAIT):
        async with serving(sends(POEM)) as server:
            resolver.names[b"poems.test"] = ["127.0.0.1"]
            assert await fetch.fetch_poem("poems.test", server.port, len(POEM), fetch.Transfer()) == POEM
    assert resolver.asked == [b"poems.test"]


# -- timeouts: the caller cancels, the fetch is closed -----------------------------


async def test_a_timeout_part_way_leaves_transfer_saying_how_far_it_got() -> None:
    transfer = fetch.Transfer()
    stall = Stall(POEM[:100])
    with trio.fail_after(WAIT):
        async with serving(stall) as server:
            with trio.CancelScope() as deadline:
                async with trio.open_nursery() as nursery:

                    async def time_out_once_all_came() -> None:
                        while transfer.received < len(stall.data):
                            await trio.sleep(0.001)
                        deadline.deadline = trio.current_time()  # the timeout fires now

                    nursery.start_soon(time_out_once_all_came)
                    await fetch.fetch_poem("127.0.0.1", server.port, len(POEM), transfer)
                    raise AssertionError("the stalled fetch returned")
            assert deadline.cancelled_caught
            # The connection was closed by the cancelled fetch: the server hears it.
            await stall.client_closed.wait()
    assert transfer.connected
    assert transfer.received == 100


async def test_a_timeout_while_connecting_leaves_transfer_not_connected() -> None:
    transfer = fetch.Transfer()
    with trio.fail_after(WAIT), not_answering() as port:
        with trio.move_on_after(0.5) as deadline:
            await fetch.fetch_poem("127.0.0.1", port, 1000, transfer)
    assert deadline.cancelled_caught
    assert not transfer.connected
    assert transfer.received == 0


async def test_a_timeout_while_connecting_to_localhost_ends_every_attempt() -> None:
    """127.0.0.1 hangs, ::1 refuses: a timeout ends the fetch and every attempt with it."""
    transfer = fetch.Transfer()
    with trio.fail_after(WAIT), not_answering(port_free_on_both()) as port, ipv6_holder(port):
        with trio.move_on_after(2 * fetch.HAPPY_EYEBALLS_DELAY) as deadline:
            await fetch.fetch_poem("localhost", port, 1000, transfer)
    assert deadline.cancelled_caught
    assert not transfer.connected


@contextmanager
def ipv6_holder(port: int) -> Any:
    """Refuse on ::1 at ``port`` too, where it can be bound (else ::1 fails anyway)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(refusing("::1", port))
        except OSError:
            pass  # no IPv6 loopback: connecting to ::1 fails by itself
        yield


# -- localhost: 127.0.0.1 and ::1, never looked up ---------------------------------


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST", "localhost."])
async def test_localhost_is_127_0_0_1_without_a_lookup(resolver: Resolver, name: str) -> None:
    with trio.fail_after(WAIT):
        async with serving(sends(POEM)) as server:
            assert await fetch.fetch_poem(name, server.port, len(POEM), fetch.Transfer()) == POEM
    assert resolver.asked == []
    assert server.peers[0][0] == "127.0.0.1"


@needs_ipv6
async def test_localhost_is_also_ipv6_loopback_without_a_lookup(resolver: Resolver) -> None:
    """Nothing listens on 127.0.0.1 at the port: the poem must come from ::1."""
    with trio.fail_after(WAIT), refusing("127.0.0.1", port_free_on_both()) as port:
        async with serving(sends(POEM), host="::1", port=port) as server:
            assert await fetch.fetch_poem("localhost", port, len(POEM), fetch.Transfer()) == POEM
    assert resolver.asked == []
    assert server.peers[0][0] == "::1"


@needs_ipv6
async def test_localhost_tries_ipv6_while_ipv4_still_hangs(resolver: Resolver) -> None:
    """Happy eyeballs: ::1 is tried after the delay even though 127.0.0.1 has not failed."""
    with trio.fail_after(WAIT), not_answering(port_free_on_both()) as port:
        async with serving(sends(POEM), host="::1", port=port) as server:
            assert await fetch.fetch_poem("localhost", port, len(POEM), fetch.Transfer()) == POEM
    assert server.peers[0][0] == "::1"
    assert resolver.asked == []


@needs_ipv6
async def test_localhost_refused_on_both_addresses_says_it_once(resolver: Resolver) -> None:
    with trio.fail_after(WAIT), refusing("127.0.0.1", port_free_on_both()) as port:
        with refusing("::1", port), pytest.raises(fetch.ConnectError) as caught:
            await fetch.fetch_poem("localhost", port, 1000, fetch.Transfer())
    assert caught.value.reasons == ["connection refused"]
    assert str(caught.value) == "connection refused"
    assert resolver.asked == []


async def test_open_first_names_each_address_when_they_fail_differently() -> None:
    with trio.fail_after(WAIT), refusing() as port:
        with pytest.raises(fetch.ConnectError) as caught:
            await fetch._open_first(("127.0.0.1", "255.255.255.255"), port)
    assert caught.value.reasons == [
        "connection refused on 127.0.0.1",
        "network is unreachable on 255.255.255.255",
    ]
    assert caught.value.unresolved is None


async def test_open_first_takes_the_address_that_answers() -> None:
    with trio.fail_after(WAIT):
        async with serving(sends(POEM)) as server:
            # The first address fails; the second, tried at once, answers.
            stream = await fetch._open_first(("255.255.255.255", "127.0.0.1"), server.port)
            async with stream:
                assert stream.socket.getpeername() == ("127.0.0.1", server.port)


# -- the words: the errors' messages --------------------------------------


def test_broken_takes_the_reason_of_the_socket_error_behind_it() -> None:
    try:
        raise trio.BrokenResourceError("socket connection broken: boom") from ConnectionResetError(
            errno.ECONNRESET, "Connection reset by peer"
        )
    except trio.BrokenResourceError as exc:
        assert fetch._broken(exc) == "connection reset"
    try:
        raise trio.BrokenResourceError("socket connection broken") from BrokenPipeError(
            errno.EPIPE, "Broken pipe"
        )
    except trio.BrokenResourceError as exc:
        assert fetch._broken(exc) == "broken pipe"


def test_broken_without_a_socket_error_says_its_own_text() -> None:
    assert fetch._broken(trio.BrokenResourceError("Stream Gone")) == "stream gone"
    assert fetch._broken(trio.BrokenResourceError()) == "connection broken"


def test_connect_error_message_is_why_it_did_not_resolve_or_each_reason() -> None:
    assert str(fetch.ConnectError(["a", "b"])) == "a, b"
    unresolved = fetch.ConnectError([], unresolved="temporary failure in name resolution")
    assert str(unresolved) == "temporary failure in name resolution"
    assert unresolved.reasons == []


def test_connect_error_from_a_resolver_failure_is_unresolved() -> None:
    error = fetch._connect_error(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert error.unresolved == "temporary failure in name resolution"
    assert error.reasons == []


def test_connect_error_from_a_group_of_attempts_has_each_reason_once() -> None:
    attempts = ExceptionGroup(
        "all",
        [
            ConnectionRefusedError(errno.ECONNREFUSED, "('127.0.0.1', 7)"),
            ExceptionGroup("nested", [ConnectionRefusedError(errno.ECONNREFUSED, "('::1', 7)")]),
            OSError(errno.ENETUNREACH, "x"),
        ],
    )
    try:
        raise OSError("all attempts to connect to poems.test:7 failed") from attempts
    except OSError as exc:
        error = fetch._connect_error(exc)
    assert error.reasons == ["connection refused", "network is unreachable"]
    assert error.unresolved is None


def test_receive_error_says_how_and_after_how_many_bytes() -> None:
    error = fetch.ReceiveError("connection reset", 812)
    assert str(error) == "connection reset after 812 bytes"
    assert (error.reason, error.received) == ("connection reset", 812)


# -- fetch_within: every failure in the same words, for get and the proxy ------------


async def test_fetch_within_returns_the_whole_poem() -> None:
    transfer = fetch.Transfer()
    async with serving(sends(POEM)) as server:
        assert await fetch.fetch_within("127.0.0.1", server.port, len(POEM), WAIT, transfer) == POEM
    assert transfer.received == len(POEM)


async def test_fetch_within_a_refused_connection_is_a_failure_before_connecting() -> None:
    with refusing() as port, pytest.raises(fetch.FetchFailed) as failed:
        await fetch.fetch_within("127.0.0.1", port, 1000, WAIT, fetch.Transfer())
    assert str(failed.value) == "connection refused"
    assert not failed.value.connected
    assert not failed.value.cut_off


async def test_fetch_within_a_name_that_does_not_resolve_says_so(resolver: Resolver) -> None:
    with pytest.raises(fetch.FetchFailed) as failed:
        await fetch.fetch_within("poems.invalid", 17, 1000, WAIT, fetch.Transfer())
    assert str(failed.value) == "cannot resolve the host name (name or service not known)"
    assert not failed.value.connected


async def test_fetch_within_a_reset_part_way_is_a_cut_off_poem_with_its_bytes_counted() -> None:
    transfer = fetch.Transfer()
    async with serving(resets_after(POEM[:1], transfer)) as server:
        with pytest.raises(fetch.FetchFailed) as failed:
            await fetch.fetch_within("127.0.0.1", server.port, len(POEM), WAIT, transfer)
    assert str(failed.value) == "connection reset after 1 byte"
    assert failed.value.connected and failed.value.cut_off


async def test_fetch_within_a_timeout_while_connecting_says_so() -> None:
    with not_answering() as port, pytest.raises(fetch.FetchFailed) as failed:
        await fetch.fetch_within("127.0.0.1", port, 1000, 0.5, fetch.Transfer())
    assert str(failed.value) == "timed out after 0.5 s while connecting"
    assert not failed.value.connected and not failed.value.cut_off


async def test_fetch_within_a_timeout_part_way_says_how_much_came() -> None:
    stall = Stall(POEM[:100])
    transfer = fetch.Transfer()
    async with serving(stall) as server:
        with pytest.raises(fetch.FetchFailed) as failed:
            await fetch.fetch_within("127.0.0.1", server.port, len(POEM), 0.5, transfer)
        await stall.client_closed.wait()
    # The stall sent its 100 bytes at once; a loaded machine may deliver
    # them late, so the count is whatever had come when time ran out.
    assert str(failed.value) == f"timed out after 0.5 s ({count(transfer.received, 'byte')} received)"
    assert failed.value.connected and not failed.value.cut_off

"""The lingering closer: close a finished connection only once its client is done."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from helpers import WAIT
from fastpoetry.linger import DRAIN_LIMIT, SWEEP_INTERVAL, LingeringCloser, nothing_at_stake

#: A linger timeout that never passes within a test: a socket closed under
#: it was closed because of what its client did.
NEVER = 10 * WAIT

Pair = tuple[socket.socket, socket.socket]


def unix_pair() -> Pair:
    """A connected (server, client) AF_UNIX stream pair."""
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return server, client


def tcp_pair(client_rcvbuf: int | None = None) -> Pair:
    """A connected (server, client) TCP pair over 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if client_rcvbuf is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
        client.settimeout(WAIT)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def served(pair: Pair) -> Pair:
    """The pair once the server has sent everything and shut down writing."""
    server, client = pair
    client.settimeout(WAIT)
    server.shutdown(socket.SHUT_WR)
    return server, client


def finished_unix() -> Pair:
    """A served AF_UNIX (server, client) pair."""
    return served(unix_pair())


@pytest.fixture(params=["unix", "tcp"])
def finished(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """A served (server, client) connection, over AF_UNIX or over TCP."""
    server, client = served(unix_pair() if request.param == "unix" else tcp_pair())
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def running_closer(nursery: trio.Nursery) -> LingeringCloser:
    """A LingeringCloser without a timeout, running in the test's nursery."""
    closer = LingeringCloser(NEVER)
    nursery.start_soon(closer.run)
    return closer


def queued(sock: socket.socket, request: int) -> int:
    """Bytes in a socket's receive (FIONREAD) or send (TIOCOUTQ) queue."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, bytes(4)))[0]


def bytes_to_eof(client: socket.socket) -> int:
    """Read until the end of the stream; how many bytes came."""
    received = 0
    while chunk := client.recv(65536):
        received += len(chunk)
    return received


async def wait_closed(sock: socket.socket) -> None:
    """Wait until ``sock`` has been closed (a hang guard, not a deadline)."""
    with trio.fail_after(WAIT):
        while sock.fileno() != -1:
            await trio.sleep(0.01)


def assert_peer_closed(client: socket.socket) -> None:
    """The AF_UNIX server end of ``client`` is closed in the kernel, not just in Python."""
    with pytest.raises(BrokenPipeError):
        client.send(b"are you there?")


async def test_closes_the_socket_once_the_client_closes(
    finished: Pair, running_closer: LingeringCloser
) -> None:
    """A lingering socket stays open while its client is connected and closes when it closes."""
    server, client = finished
    closer = running_closer
    closer.close_when_done(server)
    await trio.testing.wait_all_tasks_blocked()
    assert server.fileno() != -1 and len(closer) == 1
    assert client.recv(1) == b""  # the client has seen the end of the stream
    client.close()
    await wait_closed(server)
    assert len(closer) == 0


async def test_discards_client_input_and_keeps_waiting_for_eof(
    finished: Pair, running_closer: LingeringCloser
) -> None:
    """Input from the client is read and thrown away; the socket lingers until EOF."""
    server, client = finished
    closer = running_closer
    closer.close_when_done(server)
    junk = b"GET / HTTP/1.0\r\n" * (3 * DRAIN_LIMIT // 16)
    await trio.to_thread.run_sync(client.sendall, junk)
    with trio.fail_after(WAIT):
        while queued(client, termios.TIOCOUTQ) or queued(server, termios.FIONREAD):
            await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked()
    assert server.fileno() != -1 and len(closer) == 1
    client.close()
    await wait_closed(server)


async def test_closes_a_client_that_never_closes_after_the_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A client that stays connected is kept until the timeout, then its socket is closed."""
    server, client = finished_unix()
    with server, client:
        closer = LingeringCloser(0.2)
        nursery.start_soon(closer.run)
        handed_over = trio.current_time()
        closer.close_when_done(server)
        await trio.sleep(0.1)
        assert server.fileno() != -1
        await wait_closed(server)
        assert trio.current_time() - handed_over >= 0.2
        assert len(closer) == 0
        assert_peer_closed(client)


async def test_closes_a_client_that_resets_the_connection(nursery: trio.Nursery) -> None:
    """A client that resets its connection gets its socket closed."""
    server, client = served(tcp_pair())
    with server, client:
        closer = LingeringCloser(NEVER)
        nursery.start_soon(closer.run)
        closer.close_when_done(server)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # SO_LINGER with a zero timeout: RST instead of FIN
        await wait_closed(server)
        assert len(closer) == 0


async def test_a_late_acknowledgement_closes_a_quiet_client_at_a_sweep(
    running_closer: LingeringCloser,
) -> None:
    """A quiet client's socket handed over before it acknowledged everything
    is closed once it has, though the client never closes its end."""
    server, client = tcp_pair(client_rcvbuf=4096)
    with server, client:
        server.setblocking(False)
        sent = server.send(b"x" * (256 * 1024))  # far more than a 4 KiB window takes
        server.shutdown(socket.SHUT_WR)
        assert not nothing_at_stake(server, sent), "the premise: not acknowledged yet"
        running_closer.close_when_done(server, sent)
        await trio.testing.wait_all_tasks_blocked()
        assert server.fileno() != -1 and len(running_closer) == 1
        assert await trio.to_thread.run_sync(bytes_to_eof, client) == sent
        await wait_closed(server)
        assert len(running_closer) == 0


async def test_a_client_that_has_spoken_lingers_though_it_acknowledged_everything(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Input from the client rules out the early close for good: its socket
    stays through many sweeps, until the client closes."""
    server, client = tcp_pair()
    with server, client:
        closer = LingeringCloser(NEVER)
        nursery.start_soon(closer.run)
        client.sendall(b"hello?\n")
        server.sendall(b"poem")
        server.shutdown(socket.SHUT_WR)
        _wait_for(lambda: queued(server, termios.TIOCOUTQ) == 0 and queued(server, termios.FIONREAD) == 7)
        closer.close_when_done(server, 4)
        await trio.sleep(10 * SWEEP_INTERVAL)
        assert server.fileno() != -1 and len(closer) == 1
        assert client.recv(100) == b"poem"
        client.close()
        await wait_closed(server)


async def test_finish_ends_an_idle_run_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """finish() with nothing lingering makes run() return without waiting for a sweep."""
    closer = LingeringCloser(NEVER)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(closer.run)
            await trio.testing.wait_all_tasks_blocked()
            finished_at = trio.current_time()
            closer.finish()
    assert trio.current_time() == finished_at


async def test_run_after_finish_returns_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """run() called after finish() with nothing lingering returns without waiting."""
    closer = LingeringCloser(NEVER)
    closer.finish()
    started = trio.current_time()
    with trio.fail_after(WAIT):
        await closer.run()
    assert trio.current_time() == started


async def test_finish_waits_until_the_client_has_everything() -> None:
    """After finish(), a socket stays until its client holds every byte sent to it."""
    server, client = unix_pair()
    with server, client:
        server.sendall(b"the last stanza\n")
        server.shutdown(socket.SHUT_WR)
        client.settimeout(WAIT)
        closer = LingeringCloser(NEVER)
        returned = trio.Event()

        async def run() -> None:
            await closer.run()
            returned.set()

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                closer.close_when_done(server)
                await trio.testing.wait_all_tasks_blocked()
                closer.finish()
                await trio.sleep(0.2)  # several finishing passes
                assert not returned.is_set() and server.fileno() != -1
                assert client.recv(100) == b"the last stanza\n"
                await returned.wait()
        assert server.fileno() == -1
        assert client.recv(100) == b""  # a clean end, though it never closed


async def test_finish_does_not_wait_for_a_client_that_keeps_its_end_open() -> None:
    """A client holding everything but never closing cannot hold up finish()."""
    server, client = finished_unix()
    with server, client:
        closer = LingeringCloser(NEVER)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(closer.run)
                closer.close_when_done(server)
                await trio.testing.wait_all_tasks_blocked()
                closer.finish()
        assert server.fileno() == -1


class StepCounter(trio.abc.Instrument):
    """Counts the scheduler steps of the tasks with one name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == self.name:
            self.steps += 1


async def test_finish_with_sockets_lingering_does_not_spin() -> None:
    """After finish(), run() sleeps while sockets linger instead of waking on every tick."""
    server, client = finished_unix()
    with server, client:
        closer = LingeringCloser(NEVER)
        counter = StepCounter("closer")
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(closer.run, name="closer")
                closer.close_when_done(server)
                await trio.testing.wait_all_tasks_blocked()
                closer.finish()
                trio.lowlevel.add_instrument(counter)
                try:
                    for _ in range(50):
                        await trio.sleep(0)
                finally:
                    trio.lowlevel.remove_instrument(counter)
                    client.close()
        # Waking up to notice finish() takes a step or two; one per tick is a spin.
        assert counter.steps <= 5, f"run() ran {counter.steps} times in 50 scheduler ticks"


async def test_cancelling_run_closes_every_lingering_socket() -> None:
    """Cancelling run() closes at once every socket still lingering."""
    pairs = [finished_unix() for _ in range(3)]
    try:
        closer = LingeringCloser(NEVER)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(closer.run)
                for server, _ in pairs:
                    closer.close_when_done(server)
                await trio.testing.wait_all_tasks_blocked()
                assert len(closer) == 3
                nursery.cancel_scope.cancel()
        assert len(closer) == 0
        for server, client in pairs:
            assert server.fileno() == -1
            assert_peer_closed(client)
    finally:
        for server, client in pairs:
            server.close()
            client.close()


# The property the closer exists for, over real TCP.

#: What the server sends: large enough that most of it is still in the
#: kernel when the server is done with it.
PAYLOAD = os.urandom(4 * 1024 * 1024)
#: What the client sends first and the server never reads.
JUNK = b"GET / HTTP/1.0\r\n\r\n" * 64
#: The client reads nothing more of the payload than all but this much
#: until the server has handed its socket over; far more than the client's
#: receive buffer holds, so the rest is still queued at the server.
HOLD_BACK = 256 * 1024
CLIENT_RCVBUF = 16 * 1024


@dataclass
class Delivery:
    received: bytes
    #: What ended the client's read: None for a clean EOF.
    error: OSError | None
    #: Bytes the server's kernel had not yet delivered when it was handed over.
    in_flight: int
    server: socket.socket


def read_slowly(client: socket.socket, handed_over: threading.Event) -> tuple[bytes, OSError | None]:
    """Read all but HOLD_BACK bytes, wait for the hand-over, then read the rest in small bites."""
    received = bytearray()
    try:
        while len(received) < len(PAYLOAD) - HOLD_BACK:
            chunk = client.recv(min(65536, len(PAYLOAD) - HOLD_BACK - len(received)))
            if not chunk:
                return bytes(received), None
            received += chunk
        if not handed_over.wait(WAIT):
            raise TimeoutError("the server never handed its socket over")
        while chunk := client.recv(4096):
            received += chunk
    except OSError as exc:
        return bytes(received), exc
    finally:
        client.close()
    return bytes(received), None


async def deliver(hand_over: Callable[[socket.socket], None]) -> Delivery:
    """Send PAYLOAD to a client that sent JUNK first, then ``hand_over`` the socket.

    The whole payload is with the kernel and the write side shut down before
    the hand-over, exactly as the stream server finishes a connection.
    """
    server, client = tcp_pair(client_rcvbuf=CLIENT_RCVBUF)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024 * 1024)
    server.settimeout(WAIT)
    client.sendall(JUNK)
    assert server.recv(1, socket.MSG_PEEK) == JUNK[:1]  # the junk waits, unread
    handed_over = threading.Event()
    outcome: list[tuple[bytes, OSError | None]] = []

    async def client_side() -> None:
        outcome.append(await trio.to_thread.run_sync(read_slowly, client, handed_over))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            try:
                await trio.to_thread.run_sync(server.sendall, PAYLOAD)
                server.shutdown(socket.SHUT_WR)
                in_flight = queued(server, termios.TIOCOUTQ)
                hand_over(server)
            finally:
                handed_over.set()
    received, error = outcome[0]
    return Delivery(received, error, in_flight, server)


@pytest.mark.slow
async def test_a_client_that_sent_input_still_gets_the_whole_payload() -> None:
    """With the closer, a client that sent unread input receives every byte and a clean EOF."""
    closer = LingeringCloser(NEVER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(closer.run)
        delivery = await deliver(closer.close_when_done)
        await wait_closed(delivery.server)
        nursery.cancel_scope.cancel()
    assert delivery.in_flight > 0, "the premise: data was still in flight at the hand-over"
    assert delivery.error is None
    assert len(delivery.received) == len(PAYLOAD)
    assert delivery.received == PAYLOAD


@pytest.mark.slow
async def test_without_the_closer_unread_input_resets_the_connection() -> None:
    """The contrast: a plain close() with input unread resets the connection and loses data."""
    delivery = await deliver(socket.socket.close)
    assert delivery.in_flight > 0, "the premise: data was still in flight at the hand-over"
    assert isinstance(delivery.error, ConnectionResetError)
    assert len(delivery.received) < len(PAYLOAD)


# -- nothing_at_stake: when closing at once cannot cost the client anything ----


def _wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (hang guard only): acknowledgements arrive on their own."""
    limit = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < limit, "condition not met within WAIT"
        time.sleep(0.001)


def test_nothing_is_at_stake_once_a_quiet_client_has_acknowledged_everything() -> None:
    """A client that sent nothing and acknowledged the poem (and its end): close at once."""
    server, client = tcp_pair()
    with server, client:
        server.sendall(b"a short poem\n")
        server.shutdown(socket.SHUT_WR)
        _wait_for(lambda: nothing_at_stake(server, len(b"a short poem\n")))
        assert client.recv(100) == b"a short poem\n"
        assert client.recv(100) == b""


def test_input_from_the_client_is_at_stake() -> None:
    """Once the client has sent a byte, read or not, closing at once is ruled out."""
    server, client = tcp_pair()
    with server, client:
        client.sendall(b"\n")
        _wait_for(lambda: _queued_input(server) == 1)
        server.sendall(b"poem")
        server.shutdown(socket.SHUT_WR)
        _wait_for(lambda: client.recv(100, socket.MSG_PEEK) == b"poem")
        assert not nothing_at_stake(server, 4)
        assert server.recv(1) == b"\n"
        assert not nothing_at_stake(server, 4), "input that was read still counts"


def test_a_poem_not_yet_acknowledged_is_at_stake() -> None:
    """Bytes the client's window has not taken yet are still the server's to lose."""
    server, client = tcp_pair(client_rcvbuf=4096)
    with server, client:
        payload = b"x" * (256 * 1024)  # far more than a 4 KiB window takes
        server.setblocking(False)
        sent = server.send(payload)
        assert sent > 4096
        server.shutdown(socket.SHUT_WR)
        assert not nothing_at_stake(server, sent)
        assert bytes_to_eof(client) == sent
        _wait_for(lambda: nothing_at_stake(server, sent))


def test_nothing_at_stake_is_never_claimed_for_a_unix_socket() -> None:
    """AF_UNIX has no struct tcp_info: such sockets always linger."""
    server, client = unix_pair()
    with server, client:
        server.sendall(b"poem")
        server.shutdown(socket.SHUT_WR)
        assert client.recv(100) == b"poem"
        assert not nothing_at_stake(server, 4)


def _queued_input(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]

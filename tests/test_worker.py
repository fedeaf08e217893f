"""worker.py in-process: how a worker takes requests, and what its reporter tells the main process.

``worker.Requests`` feeds the real request channel of
``lifecycle.open_requests()``; the test reads what came out of it.  Its
signals are an async iterator of signal numbers the test gives it, and the
main process is the other end of a real link from ``link.pair()``.

``LinkReporter`` reports over a real link too, which the test reads at the
main process's end.  Its poem sources are real ``PoetryService`` objects
(started from ``first=`` bytes, so nothing reads a file); its stream
servers are small stand-ins with the counters a Reporter reads.  That a
worker tells systemd nothing itself is checked on a real NOTIFY_SOCKET
(conftest's ``notify_socket``): after the step, the test sends a marker
datagram of its own, and the marker must be the first thing that comes.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from helpers import NotifySocket, WAIT, catch_records
from fastpoetry import lifecycle, link, worker
from fastpoetry.lifecycle import Request
from fastpoetry.link import Link
from fastpoetry.poetry import PoetryService

MAIN_PID = 4242

LANTERN = "A lantern swings above the ferry.\n".encode() * 24
LEDGER = "The harbour ledger counts the boats.\n".encode() * 10


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """What worker's logger logs at any level, whatever else configured logging."""
    with catch_records(worker.log, logging.DEBUG) as caught:
        yield caught


def messages(records: list[logging.LogRecord], level: int) -> list[str]:
    return [record.getMessage() for record in records if record.levelno == level]


class Channel:
    """A worker's request channel, and what has come out of it so far."""

    def __init__(self) -> None:
        self.send, self.receive = lifecycle.open_requests()
        self.requests = worker.Requests(self.send, MAIN_PID)

    def taken(self) -> list[Request]:
        """Every request waiting in the channel, taken out."""
        out = []
        while True:
            try:
                out.append(self.receive.receive_nowait())
            except trio.WouldBlock:
                return out


@pytest.fixture
def channel() -> Channel:
    return Channel()


@pytest.fixture
def ends() -> Iterator[tuple[Link, Link]]:
    """A real link: the main process's end, and the worker's."""
    main, theirs = link.pair()
    to_main = Link(theirs)
    yield main, to_main
    main.close()
    to_main.close()


def stop(what: str) -> Request:
    return Request(reload=False, what=what)


FROM_MAIN = "a stop request from the main process"
MAIN_GONE = "end of file from the main process"


# -- Requests: the origin rule --------------------------------------------------------


def test_the_first_stop_goes_through_from_any_origin() -> None:
    for origin in ("signal", "main", "gone"):
        channel = Channel()
        channel.requests.stop(origin, f"a stop from {origin}")
        assert channel.taken() == [stop(f"a stop from {origin}")]


def test_a_second_stop_of_another_origin_is_only_logged(
    channel: Channel, records: list[logging.LogRecord]
) -> None:
    channel.requests.stop("signal", "SIGTERM")
    channel.requests.stop("main", FROM_MAIN)
    channel.requests.stop("gone", MAIN_GONE)
    assert channel.taken() == [stop("SIGTERM")]
    assert messages(records, logging.DEBUG) == [
        f"received {FROM_MAIN}: already shutting down",
        f"received {MAIN_GONE}: already shutting down",
    ]


def test_a_second_stop_of_the_same_origin_goes_through(channel: Channel) -> None:
    channel.requests.stop("signal", "SIGTERM")
    channel.requests.stop("main", FROM_MAIN)  # dropped
    channel.requests.stop("signal", "SIGINT")
    channel.requests.stop("signal", "SIGTERM")
    assert channel.taken() == [stop("SIGTERM"), stop("SIGINT"), stop("SIGTERM")]


def test_after_two_origins_only_the_first_keeps_getting_through(channel: Channel) -> None:
    channel.requests.stop("main", FROM_MAIN)
    channel.requests.stop("signal", "SIGTERM")  # dropped
    channel.requests.stop("signal", "SIGTERM")  # its origin asked before: through
    channel.requests.stop("main", FROM_MAIN)
    assert channel.taken() == [stop(FROM_MAIN), stop("SIGTERM"), stop(FROM_MAIN)]


# -- Requests: signals ---------------------------------------------------------------


async def numbers(*signums: int) -> AsyncIterator[int]:
    for signum in signums:
        yield signum


async def test_relayed_signals_stop_and_sighup_is_ignored(
    channel: Channel, records: list[logging.LogRecord]
) -> None:
    with trio.fail_after(WAIT):
        await channel.requests.relay_signals(numbers(signal.SIGHUP, signal.SIGTERM, signal.SIGHUP, signal.SIGINT))
    assert channel.taken() == [stop("SIGTERM"), stop("SIGINT")]
    ignored = f"ignoring SIGHUP: the main process (PID {MAIN_PID}) reloads every worker when it gets one"
    assert messages(records, logging.INFO) == [ignored, ignored]


# -- Requests: the main process ---------------------------------------------------------


async def next_request(channel: Channel) -> Request:
    with trio.fail_after(WAIT):
        return await channel.receive.receive()


async def test_main_reload_and_stop_become_requests(
    channel: Channel, ends: tuple[Link, Link], nursery: trio.Nursery
) -> None:
    main, to_main = ends
    nursery.start_soon(channel.requests.relay_main, to_main)
    main.send(link.RELOAD)
    assert await next_request(channel) == Request(reload=True, what="a reload request from the main process")
    main.send(link.STOP)
    assert await next_request(channel) == stop(FROM_MAIN)
    main.send(link.RELOAD)
    assert await next_request(channel) == Request(reload=True, what="a reload request from the main process")
    main.send(link.STOP)  # the same origin again
    assert await next_request(channel) == stop(FROM_MAIN)


async def test_after_a_stop_from_main_a_signal_and_the_end_of_the_link_are_only_logged(
    channel: Channel, ends: tuple[Link, Link], records: list[logging.LogRecord]
) -> None:
    main, to_main = ends
    main.send(link.STOP)
    main.close()
    with trio.fail_after(WAIT):
        await channel.requests.relay_main(to_main)
        await channel.requests.relay_signals(numbers(signal.SIGTERM))
    assert channel.taken() == [stop(FROM_MAIN)]
    assert messages(records, logging.DEBUG) == [
        f"received {MAIN_GONE}: already shutting down",
        "received SIGTERM: already shutting down",
    ]


async def test_the_end_of_the_link_is_a_stop_from_gone(
    channel: Channel, ends: tuple[Link, Link], records: list[logging.LogRecord]
) -> None:
    main, to_main = ends
    main.send(link.RELOAD)
    main.close()
    with trio.fail_after(WAIT):
        await channel.requests.relay_main(to_main)  # returns at the end of the link
    assert channel.taken() == [Request(reload=True, what="a reload request from the main process"), stop(MAIN_GONE)]
    assert messages(records, logging.WARNING) == [f"the main process (PID {MAIN_PID}) is gone"]


async def test_the_end_of_the_link_after_a_signal_is_only_logged(
    channel: Channel, ends: tuple[Link, Link], records: list[logging.LogRecord]
) -> None:
    main, to_main = ends
    channel.requests.stop("signal", "SIGTERM")
    main.close()
    with trio.fail_after(WAIT):
        await channel.requests.relay_main(to_main)
    assert channel.taken() == [stop("SIGTERM")]
    assert f"received {MAIN_GONE}: already shutting down" in messages(records, logging.DEBUG)


async def test_an_unknown_message_from_main_is_a_value_error(channel: Channel, ends: tuple[Link, Link]) -> None:
    main, to_main = ends
    main.send(link.REPORT, poems_served=1)  # a worker's message, not main's
    main.close()  # were it taken for nothing, relay_main would return at the end
    with trio.fail_after(WAIT), pytest.raises(ValueError, match="unknown message from the main process"):
        await channel.requests.relay_main(to_main)
    assert channel.taken() == []


# -- LinkReporter ----------------------------------------------------------------------


@dataclass
class FakeServer:
    """What a Reporter reads of a StreamServer."""

    listeners: list[Any] = field(default_factory=lambda: [object()])
    poems_served: int = 0
    bytes_served: int = 0
    poems_in_flight: int = 0


async def poet(poem: bytes, path: str = "/srv/poems/lantern.txt") -> PoetryService:
    """A started-from-memory poem source: ``first=`` is what its first read returns."""
    service = PoetryService(path, first=poem)
    service.use(await service.read())
    return service


async def message(main: Link) -> dict[str, Any] | None:
    with trio.fail_after(WAIT):
        return await main.receive()


@pytest.fixture
def notified(notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> NotifySocket:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    return notify_socket


_MARKER = "end of the test's step"


def nothing_sent_to_systemd(sock: NotifySocket) -> bool:
    """Whether nothing came to NOTIFY_SOCKET before a marker the test sends now.

    Datagrams on one AF_UNIX socket arrive in order: if the marker comes
    first, nothing was sent before it.  (WAIT only guards against a hang.)
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as own:
        own.sendto(f"STATUS={_MARKER}".encode(), sock.path)
    first = sock._receive(WAIT)
    assert first is not None, f"the marker did not arrive within {WAIT} s"
    return first == {"STATUS": _MARKER}


async def nothing_more_on(main: Link, to_main: Link) -> bool:
    """Whether nothing came over the link before a marker sent now (packets keep their order)."""
    to_main.send("marker")
    return await message(main) == {"type": "marker"}


async def test_ready_sends_what_it_serves_and_the_counters(ends: tuple[Link, Link], notified: NotifySocket) -> None:
    main, to_main = ends
    servers = [
        FakeServer(poems_served=3, bytes_served=2400, poems_in_flight=1),
        FakeServer(listeners=[object(), object()], poems_served=4, bytes_served=100, poems_in_flight=2),
    ]
    reporter = worker.LinkReporter([await poet(LANTERN)], servers, to_main, 2.5)
    reporter.ready()
    assert await message(main) == {
        "type": "ready",
        "serving": f"Serving lantern.txt ({len(LANTERN)} bytes) on 3 sockets",
        "reload_failure": None,
        "poems_served": 7,
        "bytes_served": 2500,
        "poems_in_flight": 3,
    }
    assert nothing_sent_to_systemd(notified)
    assert reporter.interval == 2.5


async def test_ready_after_a_failed_reload_says_why(ends: tuple[Link, Link]) -> None:
    main, to_main = ends
    sources = [await poet(LANTERN), await poet(LEDGER, "/srv/poems/ledger.txt")]
    reporter = worker.LinkReporter(sources, [FakeServer()], to_main, 5.0)
    reporter.reload_failure = "cannot load a poem from /srv/poems/ledger.txt: no such file or directory"
    reporter.ready()
    assert await message(main) == {
        "type": "ready",
        "serving": f"Serving 2 poems ({len(LANTERN) + len(LEDGER)} bytes) on 1 socket",
        "reload_failure": "cannot load a poem from /srv/poems/ledger.txt: no such file or directory",
        "poems_served": 0,
        "bytes_served": 0,
        "poems_in_flight": 0,
    }


async def test_update_status_sends_a_report_of_the_counters(ends: tuple[Link, Link], notified: NotifySocket) -> None:
    main, to_main = ends
    server = FakeServer()
    reporter = worker.LinkReporter([await poet(LANTERN)], [server], to_main, 5.0)
    reporter.update_status()
    server.poems_served, server.bytes_served, server.poems_in_flight = 5, 4000, 2
    reporter.update_status()
    assert await message(main) == {"type": "report", "poems_served": 0, "bytes_served": 0, "poems_in_flight": 0}
    assert await message(main) == {"type": "report", "poems_served": 5, "bytes_served": 4000, "poems_in_flight": 2}
    assert nothing_sent_to_systemd(notified)


async def test_reloading_and_stopping_send_nothing(ends: tuple[Link, Link], notified: NotifySocket) -> None:
    main, to_main = ends
    reporter = worker.LinkReporter([await poet(LANTERN)], [FakeServer(poems_in_flight=1)], to_main, 5.0)
    reporter.reloading()
    reporter.stopping("Shutting down, waiting up to 10 s for 1 poem in flight")
    assert nothing_sent_to_systemd(notified)
    assert await nothing_more_on(main, to_main)


async def test_ready_that_cannot_be_sent_is_a_warning(
    ends: tuple[Link, Link], records: list[logging.LogRecord]
) -> None:
    main, to_main = ends
    reporter = worker.LinkReporter([await poet(LANTERN)], [FakeServer()], to_main, 5.0)
    sent = 0
    while to_main.send(link.REPORT, filler=sent):  # the main process does not read
        sent += 1
        assert sent < 100_000, "the link never filled up"
    reporter.ready()
    assert messages(records, logging.WARNING) == ["could not tell the main process that this worker is ready"]

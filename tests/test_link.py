"""link.py in-process: messages over a real socket pair from ``link.pair()``.

The main process's end is the ``Link`` that ``pair()`` returns; the
worker's end is the other socket, wrapped in a ``Link`` of its own, or
written to raw to send packets that are not messages.  A peer that never
reads is one whose end is simply left unread; a peer that is gone is one
whose end is closed.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from helpers import WAIT
from fastpoetry import link
from fastpoetry.link import Link

# Far more messages than any socket buffer holds: only a hang guard for the loop.
_BOUND = 100_000


@pytest.fixture
def ends() -> Iterator[tuple[Link, Link]]:
    """The main process's end and the worker's, both closed afterwards."""
    ours, theirs = link.pair()
    worker = Link(theirs)
    yield ours, worker
    ours.close()
    worker.close()


@pytest.fixture
def raw() -> Iterator[tuple[Link, socket.socket]]:
    """The main process's end and the worker's socket, unwrapped."""
    ours, theirs = link.pair()
    yield ours, theirs
    ours.close()
    theirs.close()


async def receive(end: Link) -> dict[str, object] | None:
    with trio.fail_after(WAIT):
        return await end.receive()


def test_pair_is_a_seqpacket_socket_pair_ours_non_blocking() -> None:
    ours, theirs = link.pair()
    with ours.sock, theirs:
        assert ours.sock.type == socket.SOCK_SEQPACKET and theirs.type == socket.SOCK_SEQPACKET
        assert ours.sock.family == socket.AF_UNIX
        assert ours.sock.getblocking() is False


async def test_a_message_goes_both_ways_with_its_fields(ends: tuple[Link, Link]) -> None:
    main, worker = ends
    assert worker.send(
        link.READY, serving="Serving lantern.txt (812 bytes) on 1 socket", reload_failure=None, poems_served=3
    )
    assert main.send(link.RELOAD)
    assert await receive(main) == {
        "type": "ready",
        "serving": "Serving lantern.txt (812 bytes) on 1 socket",
        "reload_failure": None,
        "poems_served": 3,
    }
    assert await receive(worker) == {"type": "reload"}


async def test_messages_arrive_one_per_receive_in_order(ends: tuple[Link, Link]) -> None:
    main, worker = ends
    for number in range(5):
        assert worker.send(link.REPORT, poems_served=number)
    assert [await receive(main) for _ in range(5)] == [{"type": "report", "poems_served": n} for n in range(5)]


async def test_receive_waits_for_a_message(ends: tuple[Link, Link], nursery: trio.Nursery) -> None:
    main, worker = ends
    got: list[dict[str, object] | None] = []
    came = trio.Event()

    async def take() -> None:
        got.append(await receive(main))
        came.set()

    nursery.start_soon(take)
    await trio.testing.wait_all_tasks_blocked()
    assert got == []
    worker.send(link.STOP)
    with trio.fail_after(WAIT):
        await came.wait()
    assert got == [{"type": "stop"}]


async def test_receive_is_none_once_the_other_end_closes(ends: tuple[Link, Link]) -> None:
    main, worker = ends
    worker.send(link.REPORT, poems_served=1)
    worker.close()
    # What was sent before the close still comes first.
    assert await receive(main) == {"type": "report", "poems_served": 1}
    assert await receive(main) is None
    assert await receive(main) is None


async def test_receive_is_none_once_the_other_end_dies_with_messages_unread(ends: tuple[Link, Link]) -> None:
    main, worker = ends
    main.send(link.RELOAD)  # never read: the worker's end is closed with it queued
    worker.close()
    # Linux tells the survivor ECONNRESET then, not end of file (once: then it reads 0 bytes).
    assert await receive(main) is None


@pytest.mark.parametrize(
    "packet",
    [b"not json", b"[1, 2]", b'"ready"', b"{}", b'{"kind": "ready"}', b'{"type": 3}', b'{"type": null}'],
)
async def test_a_packet_that_is_not_a_message_is_a_value_error(
    raw: tuple[Link, socket.socket], packet: bytes
) -> None:
    main, theirs = raw
    theirs.send(packet)
    with pytest.raises(ValueError):
        await receive(main)


async def test_send_drops_a_message_the_peer_has_no_room_for(ends: tuple[Link, Link]) -> None:
    main, worker = ends
    sent = 0
    while main.send(link.REPORT, number=sent):
        sent += 1
        assert sent < _BOUND, "the link never filled up"
    assert sent > 0
    assert main.send(link.REPORT, number=sent) is False  # still full
    # Every message that send() said it sent came, whole, and nothing else.
    assert [await receive(worker) for _ in range(sent)] == [{"type": "report", "number": n} for n in range(sent)]
    assert main.send(link.STOP) is True
    assert await receive(worker) == {"type": "stop"}


@pytest.fixture
def link_debug() -> Iterator[list[logging.LogRecord]]:
    """What link's logger logs at debug level and above."""
    logger = link.log
    saved = logger.level, logger.disabled
    caught: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record)

    handler = Catch(logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.disabled = False
    yield caught
    logger.removeHandler(handler)
    logger.level, logger.disabled = saved


def test_send_to_a_closed_peer_is_dropped_silently(
    raw: tuple[Link, socket.socket], link_debug: list[logging.LogRecord]
) -> None:
    main, theirs = raw
    theirs.close()
    assert main.send(link.STOP) is True
    assert main.send(link.RELOAD) is True
    assert [(record.levelno, record.getMessage()) for record in link_debug] == [
        (logging.DEBUG, "not sent: 'stop' (broken pipe)"),
        (logging.DEBUG, "not sent: 'reload' (broken pipe)"),
    ]

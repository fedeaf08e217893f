"""report.py in-process: the status lines, the summaries, and what systemd hears.

The poem sources are real: PoetryService objects given a poem with use(),
and ProxyService objects that fetch from an upstream of the test's own in
its event loop.  The stream servers are small stand-ins with the counters
a Reporter reads (a real StreamServer counts only while it serves), except
in one test where a real one serves real clients.  NOTIFY_SOCKET is a real
AF_UNIX datagram socket the test binds (conftest.NotifySocket).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from helpers import NotifySocket, WAIT, catch_records
from fastpoetry import report
from fastpoetry.fetch import Transfer, fetch_poem
from fastpoetry.poetry import PoetryService
from fastpoetry.proxy import ProxyService
from fastpoetry.stream import StreamServer

LANTERN = "A lantern swings above the ferry.\n".encode() * 24
LEDGER = "The harbour ledger counts the boats.\n".encode() * 10


@dataclass
class FakeServer:
    """What a Reporter reads of a StreamServer."""

    listeners: list[Any] = field(default_factory=lambda: [object()])
    clients_lingering: int = 0
    poems_served: int = 0
    bytes_served: int = 0
    poems_in_flight: int = 0
    headers_refused: int = 0
    handshakes_failed: int = 0


def poet(poem: bytes, path: str = "/srv/poems/lantern.txt", name: str | None = None) -> PoetryService:
    service = PoetryService(path, name)
    service.use(poem)
    return service


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """What report's logger logs at info level and above, whatever else configured logging."""
    with catch_records(report.log, logging.INFO) as caught:
        yield caught


# -- count() -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "expected"),
    [(0, "0 poems"), (1, "1 poem"), (2, "2 poems"), (11, "11 poems"), (21, "21 poems")],
)
def test_count_says_the_plural_unless_one(number: int, expected: str) -> None:
    assert report.count(number, "poem") == expected


def test_count_only_adds_an_s() -> None:
    assert report.count(1, "socket") == "1 socket"
    assert report.count(3, "worker") == "3 workers"


# -- Reporter: the lines -----------------------------------------------------------


def test_serving_one_poem_names_its_file_size_and_sockets() -> None:
    reporter = report.Reporter([poet(LANTERN)], [FakeServer()])
    assert reporter.serving() == f"Serving lantern.txt ({len(LANTERN)} bytes) on 1 socket"


def test_serving_one_poem_names_it_by_its_name_when_it_has_one() -> None:
    reporter = report.Reporter([poet(LANTERN, name="evening")], [FakeServer(listeners=[1, 2])])
    assert reporter.serving() == f"Serving evening ({len(LANTERN)} bytes) on 2 sockets"


def test_serving_several_poems_counts_them_and_adds_sizes_and_sockets() -> None:
    poets = [poet(LANTERN), poet(LEDGER, "/srv/poems/harbour-ledger.txt")]
    servers = [FakeServer(listeners=[1]), FakeServer(listeners=[1, 2])]
    reporter = report.Reporter(poets, servers)
    assert reporter.serving() == f"Serving 2 poems ({len(LANTERN) + len(LEDGER)} bytes) on 3 sockets"


def test_status_adds_the_poems_served_by_every_server() -> None:
    servers = [FakeServer(), FakeServer()]
    reporter = report.Reporter([poet(LANTERN)], servers)
    serving = f"Serving lantern.txt ({len(LANTERN)} bytes) on 2 sockets"
    assert reporter.status() == f"{serving}; 0 poems served"
    servers[0].poems_served = 1
    assert reporter.status() == f"{serving}; 1 poem served"
    servers[1].poems_served = 4
    assert reporter.status() == f"{serving}; 5 poems served"


def test_counters_are_the_sums_over_the_servers() -> None:
    servers = [
        FakeServer(poems_served=2, bytes_served=20, poems_in_flight=1),
        FakeServer(poems_served=3, bytes_served=30, poems_in_flight=4),
    ]
    reporter = report.Reporter([poet(LANTERN)], servers)
    assert (reporter.poems_served, reporter.bytes_served, reporter.poems_in_flight) == (5, 50, 5)


def test_status_says_why_the_last_reload_failed_until_one_succeeds() -> None:
    reporter = report.Reporter([poet(LANTERN)], [FakeServer()])
    plain = reporter.status()
    reporter.reload_failure = "cannot load a poem from /srv/poems/lantern.txt: the file is empty"
    assert reporter.status() == (
        f"{plain}; last reload failed: cannot load a poem from /srv/poems/lantern.txt: the file is empty"
    )
    reporter.reload_failure = None
    assert reporter.status() == plain


# -- Reporter: the summary in the log ----------------------------------------------


def test_log_summary_logs_nothing_when_nothing_was_served(records: list[logging.LogRecord]) -> None:
    reporter = report.Reporter([poet(LANTERN)], [FakeServer()])
    reporter.log_summary()
    assert records == []


def test_log_summary_logs_what_is_new_with_fields(records: list[logging.LogRecord]) -> None:
    servers = [FakeServer(), FakeServer()]
    reporter = report.Reporter([poet(LANTERN)], servers)
    servers[0].poems_served, servers[0].bytes_served = 2, 2 * len(LANTERN)
    reporter.log_summary()
    [first] = records
    assert first.levelno == logging.INFO
    assert first.getMessage() == (
        f"served 2 poems ({2 * len(LANTERN)} bytes) since the last summary; 2 poems in total"
    )
    assert (first.POEMS, first.BYTES, first.POEMS_TOTAL) == (2, 2 * len(LANTERN), 2)  # type: ignore[attr-defined]
    assert first.CLIENTS_LINGERING == 0  # type: ignore[attr-defined]
    assert (first.HEADERS_REFUSED_TOTAL, first.HANDSHAKES_FAILED_TOTAL) == (0, 0)  # type: ignore[attr-defined]

    reporter.log_summary()  # nothing new since
    assert len(records) == 1

    servers[1].poems_served, servers[1].bytes_served = 1, len(LANTERN)
    servers[0].clients_lingering, servers[1].clients_lingering = 2, 1
    servers[0].headers_refused, servers[1].headers_refused = 4, 1
    servers[1].handshakes_failed = 6
    reporter.log_summary()
    second = records[-1]
    assert len(records) == 2
    assert second.getMessage() == (
        f"served 1 poem ({len(LANTERN)} bytes) since the last summary; 3 poems in total"
    )
    assert (second.POEMS, second.BYTES, second.POEMS_TOTAL) == (1, len(LANTERN), 3)  # type: ignore[attr-defined]
    assert second.CLIENTS_LINGERING == 3  # type: ignore[attr-defined]
    assert (second.HEADERS_REFUSED_TOTAL, second.HANDSHAKES_FAILED_TOTAL) == (5, 6)  # type: ignore[attr-defined]


def test_log_summary_ignores_bytes_without_a_new_poem(records: list[logging.LogRecord]) -> None:
    """Only poems count as news: a summary with 0 poems would say nothing."""
    server = FakeServer()
    reporter = report.Reporter([poet(LANTERN)], [server])
    server.bytes_served = 100
    reporter.log_summary()
    assert records == []


# -- the proxy's line --------------------------------------------------------------


@asynccontextmanager
async def upstream(replies: list[bytes]) -> AsyncIterator[int]:
    """A poetry server on 127.0.0.1: each client gets ``replies[0]`` as it is then."""
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(16)

        async def serve() -> None:
            while True:
                conn, _ = await listener.accept()
                with conn:
                    view = memoryview(replies[0])
                    while view:
                        view = view[await conn.send(view) :]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield listener.getsockname()[1]
            nursery.cancel_scope.cancel()


def refused_port() -> socket.socket:
    """A socket bound to a port on 127.0.0.1 and never listening: connecting is refused."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    return holder


def test_proxy_status_before_any_fetch_says_it_is_fetching() -> None:
    proxy = ProxyService("127.0.0.1", 7, timeout=WAIT, refresh=3600)
    reporter = report.Reporter([proxy], [FakeServer()])
    assert reporter.status() == "Waiting for a poem from upstream 127.0.0.1:7: fetching; 0 poems served"


def test_proxy_status_names_an_ipv6_upstream_in_brackets() -> None:
    proxy = ProxyService("::1", 7, timeout=WAIT, refresh=3600)
    reporter = report.Reporter([proxy], [FakeServer()])
    assert reporter.status().startswith("Waiting for a poem from upstream [::1]:7: fetching;")


async def test_proxy_status_without_a_poem_says_why() -> None:
    with trio.fail_after(WAIT), refused_port() as holder:
        port = holder.getsockname()[1]
        proxy = ProxyService("127.0.0.1", port, timeout=WAIT, refresh=3600)
        server = FakeServer()
        reporter = report.Reporter([proxy], [server])
        async with trio.open_nursery() as nursery:
            await proxy.start(nursery)
            server.poems_served = 1
            assert reporter.status() == (
                f"Waiting for a poem from upstream 127.0.0.1:{port}: connection refused; 1 poem served"
            )
            reporter.reload_failure = "upstream 127.0.0.1 did not answer"
            assert reporter.status().endswith("; 1 poem served; last reload failed: upstream 127.0.0.1 did not answer")
            await proxy.stop()


async def test_proxy_status_with_a_poem_and_then_a_failing_upstream() -> None:
    replies = [LEDGER]
    with trio.fail_after(WAIT):
        async with upstream(replies) as port:
            proxy = ProxyService("127.0.0.1", port, timeout=WAIT, refresh=3600)
            server = FakeServer(listeners=[1, 2], poems_served=3)
            reporter = report.Reporter([proxy], [server])
            async with trio.open_nursery() as nursery:
                await proxy.start(nursery)
                line = (
                    f"Serving the poem of upstream 127.0.0.1:{port} ({len(LEDGER)} bytes) "
                    f"on 2 sockets; 3 poems served"
                )
                assert reporter.status() == line
                replies[0] = b""  # the upstream sends nothing usable now
                assert not await proxy.refresh()
                assert reporter.status() == f"{line}; upstream failing: the reply is empty"
                reporter.reload_failure = "why"
                assert reporter.status() == f"{line}; upstream failing: the reply is empty; last reload failed: why"
                replies[0] = LEDGER
                reporter.reload_failure = None
                assert await proxy.refresh()
                assert reporter.status() == line
                await proxy.stop()


def test_proxy_among_several_sources_gets_the_plain_line() -> None:
    """The proxy's own line is for a proxy alone; with others it is one poem of several."""
    proxy = ProxyService("127.0.0.1", 7, timeout=WAIT, refresh=3600)
    reporter = report.Reporter([proxy, poet(LANTERN)], [FakeServer()])
    assert reporter.status() == f"Serving 2 poems ({len(LANTERN)} bytes) on 1 socket; 0 poems served"


# -- TeamReporter ---------------------------------------------------------------


def serving_line() -> str:
    return report.Reporter([poet(LANTERN)], [FakeServer()]).serving()


def test_workers_status_says_how_many_workers_and_adds_their_poems() -> None:
    reports = [
        report.WorkerReport(serving=serving_line(), poems_served=3, bytes_served=30, poems_in_flight=1),
        report.WorkerReport(serving=serving_line(), poems_served=4, bytes_served=40, poems_in_flight=2),
    ]
    reporter = report.TeamReporter(reports)
    assert reporter.status() == f"{serving_line()} with 2 workers; 7 poems served"
    assert (reporter.poems_served, reporter.bytes_served, reporter.poems_in_flight) == (7, 70, 3)


def test_workers_status_with_one_worker_and_one_poem() -> None:
    reporter = report.TeamReporter([report.WorkerReport(serving=serving_line(), poems_served=1)])
    assert reporter.status() == f"{serving_line()} with 1 worker; 1 poem served"


def test_workers_status_takes_the_first_workers_serving_line() -> None:
    reports = [report.WorkerReport(serving="Serving a"), report.WorkerReport(serving="Serving b")]
    assert report.TeamReporter(reports).status() == "Serving a with 2 workers; 0 poems served"


def test_workers_reload_failure_is_none_while_no_worker_failed() -> None:
    reporter = report.TeamReporter([report.WorkerReport(serving="S"), report.WorkerReport(serving="S")])
    assert reporter.reload_failure is None
    assert "last reload failed" not in reporter.status()


def test_workers_reload_failure_in_every_worker_is_said_plainly() -> None:
    reports = [
        report.WorkerReport(serving="S", reload_failure="the file is empty"),
        report.WorkerReport(serving="S", reload_failure="the file is empty"),
    ]
    reporter = report.TeamReporter(reports)
    assert reporter.reload_failure == "the file is empty"
    assert reporter.status() == "S with 2 workers; 0 poems served; last reload failed: the file is empty"


def test_workers_reload_failure_in_some_workers_says_in_how_many() -> None:
    reports = [
        report.WorkerReport(serving="S"),
        report.WorkerReport(serving="S", reload_failure="not UTF-8 text"),
        report.WorkerReport(serving="S", reload_failure="the file is empty"),
    ]
    reporter = report.TeamReporter(reports)
    # The first failure's words, and how many of the workers had one.
    assert reporter.reload_failure == "not UTF-8 text (in 2 of 3 workers)"
    assert reporter.status() == (
        "S with 3 workers; 0 poems served; last reload failed: not UTF-8 text (in 2 of 3 workers)"
    )
    reports[1].reload_failure = None
    assert reporter.reload_failure == "the file is empty (in 1 of 3 workers)"
    reports[2].reload_failure = None
    assert reporter.reload_failure is None


def test_workers_reload_failure_in_one_of_two_workers() -> None:
    reports = [report.WorkerReport(serving="S", reload_failure="gone"), report.WorkerReport(serving="S")]
    assert report.TeamReporter(reports).reload_failure == "gone (in 1 of 2 workers)"


# -- what systemd hears: a real NOTIFY_SOCKET --------------------------------------


@pytest.fixture
def notified(notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> NotifySocket:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    return notify_socket


_MARKER = "end of the test's step"


def sent_by(sock: NotifySocket, step: Callable[[], object]) -> list[dict[str, str]]:
    """Every message ``step`` sent to systemd, in order, and nothing else.

    After the step the test sends a marker of its own: datagrams on one
    AF_UNIX socket arrive in order, so what came before the marker is what
    the step sent.  (WAIT only guards against a hang.)
    """
    step()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as own:
        own.sendto(f"STATUS={_MARKER}".encode(), sock.path)
    messages = []
    while (message := sock._receive(WAIT)) != {"STATUS": _MARKER}:
        assert message is not None, f"the marker did not arrive within {WAIT} s"
        messages.append(message)
    return messages


def test_update_status_says_nothing_before_ready(notified: NotifySocket) -> None:
    server = FakeServer()
    reporter = report.Reporter([poet(LANTERN)], [server])
    server.poems_served = 2
    assert sent_by(notified, reporter.update_status) == []


def test_ready_sends_ready_and_the_status_line(
    notified: NotifySocket, records: list[logging.LogRecord]
) -> None:
    reporter = report.Reporter([poet(LANTERN)], [FakeServer()])
    status = f"Serving lantern.txt ({len(LANTERN)} bytes) on 1 socket; 0 poems served"
    assert sent_by(notified, reporter.ready) == [{"READY": "1", "STATUS": status}]
    assert [record.getMessage() for record in records] == [f"ready: s{status[1:]}"]


def test_update_status_sends_the_line_only_when_it_changed(notified: NotifySocket) -> None:
    server = FakeServer()
    reporter = report.Reporter([poet(LANTERN)], [server])
    assert len(sent_by(notified, reporter.ready)) == 1

    assert sent_by(notified, reporter.update_status) == []  # unchanged since ready

    server.poems_served = 1
    assert reporter.status().endswith("; 1 poem served")
    assert sent_by(notified, reporter.update_status) == [{"STATUS": reporter.status()}]
    assert sent_by(notified, reporter.update_status) == []  # unchanged since the last one

    reporter.reload_failure = "the file is empty"
    assert reporter.status().endswith("; last reload failed: the file is empty")
    assert sent_by(notified, reporter.update_status) == [{"STATUS": reporter.status()}]


def test_ready_again_after_a_reload_sends_ready_even_if_unchanged(notified: NotifySocket) -> None:
    reporter = report.Reporter([poet(LANTERN)], [FakeServer()])
    first = sent_by(notified, reporter.ready)
    assert sent_by(notified, reporter.reloading)[0]["RELOADING"] == "1"
    assert sent_by(notified, reporter.ready) == first


def test_workers_reporter_announces_the_same_way(notified: NotifySocket) -> None:
    reports = [report.WorkerReport(serving="Serving x (3 bytes) on 1 socket")]
    reporter = report.TeamReporter(reports)
    assert sent_by(notified, reporter.update_status) == []
    assert sent_by(notified, reporter.ready) == [
        {"READY": "1", "STATUS": "Serving x (3 bytes) on 1 socket with 1 worker; 0 poems served"}
    ]
    reports[0].poems_served = 5
    assert sent_by(notified, reporter.update_status) == [
        {"STATUS": "Serving x (3 bytes) on 1 socket with 1 worker; 5 poems served"}
    ]


def test_reloading_and_stopping_are_announced(notified: NotifySocket) -> None:
    reporter = report.Reporter([poet(LANTERN)], [FakeServer()])
    [reloading] = sent_by(notified, reporter.reloading)
    assert reloading["RELOADING"] == "1"
    assert reloading["STATUS"] == "Reloading poems"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert sent_by(notified, lambda: reporter.stopping("Waiting for 2 poems in flight")) == [
        {"STOPPING": "1", "STATUS": "Waiting for 2 poems in flight"}
    ]


# -- with a real stream server -----------------------------------------------------


async def test_a_real_server_counts_what_the_reporter_reports(
    records: list[logging.LogRecord],
) -> None:
    source = poet(LANTERN)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    server = StreamServer(source, [listener], send_timeout=WAIT)
    reporter = report.Reporter([source], [server])
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            for _ in range(3):
                assert await fetch_poem("127.0.0.1", port, len(LANTERN), Transfer()) == LANTERN
            await trio.testing.wait_all_tasks_blocked()
            assert reporter.status() == (
                f"Serving lantern.txt ({len(LANTERN)} bytes) on 1 socket; 3 poems served"
            )
            records.clear()
            reporter.log_summary()
            await server.stop()
    [summary] = records
    assert (summary.POEMS, summary.BYTES, summary.POEMS_TOTAL) == (3, 3 * len(LANTERN), 3)  # type: ignore[attr-defined]

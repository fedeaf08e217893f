"""The main process's side of ``serve --workers`` (:mod:`fastpoetry.supervisor`), in-process.

The supervisor's parts (:class:`Team`, :class:`Watchdog`,
:meth:`Supervisor.hurry`) run here in the test's own event loop, around
:class:`WorkerProcess` records of real child processes: each test forks
stand-ins for workers (:class:`Forks`) that talk over the worker end of a
real :func:`fastpoetry.link.pair` the way a worker does, following a small
:class:`Script` (say ``ready``, send reports, answer ``stop`` and
``reload``, exit with a chosen status), with blocking socket calls only,
and end in :func:`os._exit`: no test code runs in a child after the fork.
The pidfds are real (``pidfd_open``), so exits are watched and reaped as
they are in production; a fixture kills and reaps every child a test
leaves behind, through pidfds of its own, which cannot hit a reused PID.

Watchdog pings go to a real NOTIFY_SOCKET (the ``notify_socket`` fixture).
sd_notify's datagram is queued before it returns, so a ping that was not
sent is an empty queue right after the call, not a wait for silence.  A
worker is made late by moving its ``last_heard`` back by an hour: no test
depends on how long anything takes.  ``serve --workers`` as a command,
with real workers, is ``test_workers.py``'s.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from fastpoetry import link
from fastpoetry.options import ServeConfig
from fastpoetry.service import Application, TimerService
from fastpoetry.supervisor import Supervisor, Team, Watchdog, WorkerProcess, _how_it_ended
from helpers import WAIT, NotifySocket, wait_until_async

#: How far back a late worker's last report is put: far beyond any interval used here.
HOUR = 3600.0

# The exit status of a child whose script went wrong (the test then fails on it).
_CHILD_BROKE = 99


@dataclass
class Script:
    """What a forked stand-in for a worker does, in order."""

    #: The fields of its READY message, sent at start (unless not ``ready_at_start``) and after every RELOAD.
    ready: dict[str, Any] = field(
        default_factory=lambda: {
            "serving": "Serving lantern.txt (812 bytes) on 1 socket",
            "reload_failure": None,
            "poems_served": 0,
            "bytes_served": 0,
            "poems_in_flight": 0,
        }
    )
    ready_at_start: bool = True
    #: REPORT messages' counters, sent after the READY at start.
    reports: list[dict[str, int]] = field(default_factory=list)
    #: Exit with this status right after the messages above, without being asked.
    exit_at_once: int | None = None
    #: Exit with ``status`` once this many STOPs have come; each STOP is answered
    #: with a REPORT whose ``poems_served`` is how many have come so far.
    stops: int = 1
    status: int = 0


def _run_script(sock: socket.socket, script: Script) -> int:
    """The child's life; returns its exit status.  Only socket calls: nothing of pytest or trio."""
    sock.setblocking(True)

    def send(kind: str, **fields: Any) -> None:
        sock.send(json.dumps({"type": kind, **fields}).encode())

    if script.ready_at_start:
        send(link.READY, **script.ready)
    for counts in script.reports:
        send(link.REPORT, **counts)
    if script.exit_at_once is not None:
        return script.exit_at_once
    stops = 0
    while stops < script.stops:
        data = sock.recv(65536)
        if not data:  # the main process's end closed: never in these tests
            return _CHILD_BROKE
        kind = json.loads(data)["type"]
        if kind == link.STOP:
            stops += 1
            send(link.REPORT, poems_served=stops, bytes_served=0, poems_in_flight=0)
        elif kind == link.RELOAD:
            send(link.READY, **script.ready)
    return script.status


class Forks:
    """Forks stand-ins for workers; :meth:`close` kills and reaps whatever is left of them."""

    def __init__(self) -> None:
        self.workers: list[WorkerProcess] = []
        # Our own pidfd of each child: unlike its PID, it cannot name another
        # process once the child has been reaped (by Team, or here).
        self._pidfds: list[int] = []
        #: The worker ends of links this process keeps open too (see :meth:`worker`).
        self.kept: dict[WorkerProcess, socket.socket] = {}

    def worker(self, script: Script, keep_their_end: bool = False) -> WorkerProcess:
        """A new child following ``script``, as the main process records it (numbered from 1).

        With ``keep_their_end`` the test keeps the child's end of the link
        open as well (in :attr:`kept`), so that the link outlives the child;
        children forked after it inherit that end too.
        """
        ours, theirs = link.pair()
        pid = os.fork()
        if pid == 0:
            status = _CHILD_BROKE
            try:
                ours.close()
                status = _run_script(theirs, script)
            finally:
                os._exit(status)
        self._pidfds.append(os.pidfd_open(pid))
        process = WorkerProcess(len(self.workers) + 1, pid, ours, os.pidfd_open(pid))
        self.workers.append(process)
        if keep_their_end:
            self.kept[process] = theirs
        else:
            theirs.close()
        return process

    def close(self) -> None:
        for pidfd in self._pidfds:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # reaped already
            try:
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            except ChildProcessError:
                pass  # reaped already
            os.close(pidfd)
        for sock in self.kept.values():
            sock.close()
        for process in self.workers:
            process.link.close()
            if process.exit_code is None:  # not reaped by Team: its pidfd is still open
                os.close(process.pidfd)


@pytest.fixture
def forks() -> Iterator[Forks]:
    made = Forks()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """The package's log records, at DEBUG, even if logs.setup cut propagation."""
    monkeypatch.setattr(logging.getLogger("fastpoetry"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="fastpoetry")
    return caplog


@pytest.fixture(autouse=True)
def no_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing goes to a systemd of the test runner's; a test that listens sets its own."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


def messages(caplog: pytest.LogCaptureFixture, level: int, logger: str = "fastpoetry.supervisor") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


def pending(notify: NotifySocket) -> list[str]:
    """Every notification queued at ``notify`` now, without waiting for more."""
    notify.sock.setblocking(False)
    queued = []
    while True:
        try:
            queued.append(notify.sock.recv(65536).decode())
        except BlockingIOError:
            return queued


async def ready_team(nursery: trio.Nursery, workers: list[WorkerProcess], lost: list[str]) -> Team:
    """A started :class:`Team` of ``workers`` that has heard every READY; ``lost`` collects its losses."""
    team = Team(workers, lost.append)
    await team.start(nursery)
    with trio.fail_after(WAIT):
        await team.all_ready()
    return team


async def stop(team: Team) -> None:
    with trio.fail_after(WAIT):
        await team.stop()


# -- Team: starting ------------------------------------------------------------------


def _ready(serving: str, failure: str | None, served: int, size: int, in_flight: int) -> dict[str, Any]:
    return {
        "serving": serving,
        "reload_failure": failure,
        "poems_served": served,
        "bytes_served": size,
        "poems_in_flight": in_flight,
    }


async def test_all_ready_fills_each_workers_report_from_its_ready(forks: Forks) -> None:
    first = forks.worker(Script(ready=_ready("Serving a.txt (1 bytes) on 1 socket", None, 3, 30, 1)))
    second = forks.worker(Script(ready=_ready("Serving b.txt (2 bytes) on 2 sockets", "oops", 4, 40, 2)))
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        assert (first.report.serving, first.report.reload_failure) == ("Serving a.txt (1 bytes) on 1 socket", None)
        assert (first.report.poems_served, first.report.bytes_served, first.report.poems_in_flight) == (3, 30, 1)
        assert (second.report.serving, second.report.reload_failure) == ("Serving b.txt (2 bytes) on 2 sockets", "oops")
        assert (second.report.poems_served, second.report.bytes_served, second.report.poems_in_flight) == (4, 40, 2)
        await stop(team)
    assert lost == []


async def test_all_ready_waits_for_the_last_worker_to_say_ready(forks: Forks) -> None:
    early = forks.worker(Script())
    # Says ready only when told to reload: until then all_ready must wait.
    late = forks.worker(Script(ready_at_start=False))
    done = trio.Event()
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = Team(forks.workers, lost.append)
        await team.start(nursery)

        async def wait_all() -> None:
            await team.all_ready()
            done.set()

        nursery.start_soon(wait_all)
        await wait_until_async(lambda: early.report.serving != "")
        assert not done.is_set()
        assert late.report.serving == ""
        late.tell(link.RELOAD)
        with trio.fail_after(WAIT):
            await done.wait()
        assert late.report.serving == Script().ready["serving"]
        await stop(team)
    assert lost == []


async def test_a_report_updates_the_counters_and_keeps_what_the_ready_said(forks: Forks) -> None:
    worker = forks.worker(
        Script(
            ready=_ready("Serving a.txt (1 bytes) on 1 socket", "bad poem", 1, 10, 0),
            reports=[{"poems_served": 5, "bytes_served": 50, "poems_in_flight": 2}],
        )
    )
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        await wait_until_async(lambda: worker.report.poems_served == 5)
        assert (worker.report.bytes_served, worker.report.poems_in_flight) == (50, 2)
        assert (worker.report.serving, worker.report.reload_failure) == ("Serving a.txt (1 bytes) on 1 socket", "bad poem")
        await stop(team)


# -- Team: stopping ----------------------------------------------------------------------


async def test_stop_tells_every_worker_to_stop_and_returns_once_all_exited_and_hung_up(forks: Forks) -> None:
    forks.worker(Script(status=0))
    forks.worker(Script(status=0))
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        await stop(team)
        assert team.stopping
        for process in team.workers:
            assert process.exited.is_set() and process.hung_up.is_set(), process
            assert process.exit_code == 0, process
            # The REPORT each sent when the STOP came, before exiting, is in.
            assert process.report.poems_served == 1, process
        assert team.living == []
    assert lost == []


async def test_stop_returns_only_once_the_link_has_hung_up_with_the_last_report_in(forks: Forks) -> None:
    # The test holds the worker's end of the link too: the worker exits, but
    # the link stays up until the test sends a last report and closes it.
    worker = forks.worker(Script(status=0), keep_their_end=True)
    lost: list[str] = []
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)

        async def stop_team() -> None:
            await stop(team)
            stopped.set()

        nursery.start_soon(stop_team)
        with trio.fail_after(WAIT):
            await worker.exited.wait()
        await wait_until_async(lambda: worker.report.poems_served == 1)
        await trio.testing.wait_all_tasks_blocked()
        assert not worker.hung_up.is_set()
        assert not stopped.is_set(), "stop returned before the link hung up"
        last_words = link.Link(forks.kept.pop(worker))
        last_words.send(link.REPORT, poems_served=7, bytes_served=70, poems_in_flight=0)
        last_words.close()
        with trio.fail_after(WAIT):
            await stopped.wait()
        assert worker.hung_up.is_set()
        assert (worker.report.poems_served, worker.report.bytes_served) == (7, 70)
    assert worker.exit_code == 0
    assert lost == []


async def test_stop_tells_only_the_workers_still_running(forks: Forks, records: pytest.LogCaptureFixture) -> None:
    gone = forks.worker(Script(exit_at_once=0))
    running = forks.worker(Script(status=0))
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        await wait_until_async(lambda: gone.exited.is_set() and gone.hung_up.is_set())
        assert team.living == [running]
        await stop(team)
    assert lost == [""]  # it exited 0 unasked
    assert running.report.poems_served == 1
    assert gone.report.poems_served == 0
    # A STOP to the worker that has gone would have found its end closed.
    assert not [m for m in messages(records, logging.DEBUG, "fastpoetry.link") if m.startswith("not sent")]


@pytest.mark.parametrize("status", [0, 3])
async def test_an_exit_while_stopping_does_not_call_lost(
    forks: Forks, records: pytest.LogCaptureFixture, status: int
) -> None:
    failing = forks.worker(Script(status=status))
    forks.worker(Script(status=0))
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        await stop(team)
    assert lost == []
    assert failing.exit_code == status
    errors = messages(records, logging.ERROR)
    if status:
        # Still logged, without stopping the others: they are being stopped.
        assert errors == [f"{failing} exited with status {status}"]
    else:
        assert errors == []


# -- Team: losing a worker -----------------------------------------------------------------


async def test_a_worker_that_exits_unasked_with_status_3_is_lost_with_its_status(
    forks: Forks, records: pytest.LogCaptureFixture
) -> None:
    crashing = forks.worker(Script(exit_at_once=3))
    other = forks.worker(Script(status=0))
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        await wait_until_async(lambda: bool(lost))
        assert lost == [f"worker 1 (PID {crashing.pid}) exited with status 3"]
        assert crashing.exit_code == 3
        assert not team.stopping
        assert team.living == [other]
        assert messages(records, logging.ERROR) == [
            f"worker 1 (PID {crashing.pid}) exited with status 3: stopping the other workers"
        ]
        await stop(team)
    assert len(lost) == 1, lost


async def test_a_worker_killed_by_sigkill_is_lost_with_the_signal(forks: Forks) -> None:
    forks.worker(Script(status=0))
    killed = forks.worker(Script(status=0))
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        os.kill(killed.pid, signal.SIGKILL)  # not reaped yet: the PID is still the child's
        await wait_until_async(lambda: bool(lost))
        assert lost == [f"worker 2 (PID {killed.pid}) was killed by SIGKILL"]
        assert killed.exit_code == -signal.SIGKILL
        await stop(team)
    assert len(lost) == 1, lost


async def test_a_worker_that_exits_0_unasked_is_lost_without_a_failure(
    forks: Forks, records: pytest.LogCaptureFixture
) -> None:
    quitting = forks.worker(Script(exit_at_once=0))
    forks.worker(Script(status=0))
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        await wait_until_async(lambda: bool(lost))
        assert lost == [""]
        assert quitting.exit_code == 0
        assert f"{quitting} has shut down by itself: stopping the other workers" in messages(records, logging.INFO)
        assert messages(records, logging.ERROR) == []
        await stop(team)
    assert lost == [""]


# -- Watchdog ------------------------------------------------------------------------------


@pytest.fixture
def notify(notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> NotifySocket:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    return notify_socket


async def test_watchdog_pings_when_every_worker_reported_within_the_interval(
    forks: Forks, notify: NotifySocket, records: pytest.LogCaptureFixture
) -> None:
    forks.worker(Script())
    forks.worker(Script())
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        watchdog = Watchdog(team, HOUR)
        watchdog.ping()
        assert pending(notify) == ["WATCHDOG=1"]
        watchdog.ping()
        assert pending(notify) == ["WATCHDOG=1"]
        assert messages(records, logging.WARNING) == []
        await stop(team)


async def test_watchdog_does_not_ping_while_a_worker_is_silent_and_names_it_once(
    forks: Forks, notify: NotifySocket, records: pytest.LogCaptureFixture
) -> None:
    forks.worker(Script())
    silent = forks.worker(Script())
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        watchdog = Watchdog(team, 1.0)
        silent.last_heard = trio.current_time() - HOUR
        watchdog.ping()
        assert pending(notify) == []
        warnings = messages(records, logging.WARNING)
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"worker 2 (PID {silent.pid}) has not reported for ")
        assert warnings[0].endswith(" s: not pinging the systemd watchdog")
        # Still silent: still no ping, and no second warning.
        watchdog.ping()
        assert pending(notify) == []
        assert len(messages(records, logging.WARNING)) == 1
        await stop(team)


async def test_watchdog_pings_again_once_the_silent_worker_reports(
    forks: Forks, notify: NotifySocket, records: pytest.LogCaptureFixture
) -> None:
    forks.worker(Script())
    silent = forks.worker(Script())
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        watchdog = Watchdog(team, 1.0)
        silent.last_heard = trio.current_time() - HOUR
        watchdog.ping()
        assert pending(notify) == []
        # A real message from the worker: its READY after a reload.
        silent.tell(link.RELOAD)
        with trio.fail_after(WAIT):
            await silent.next_ready()
        watchdog.ping()
        assert pending(notify) == ["WATCHDOG=1"]
        assert f"worker 2 (PID {silent.pid}) reports again: pinging the systemd watchdog" in messages(
            records, logging.INFO
        )
        await stop(team)


async def test_watchdog_pings_regardless_of_silence_while_the_team_stops(
    forks: Forks, notify: NotifySocket, records: pytest.LogCaptureFixture
) -> None:
    slow = forks.worker(Script(stops=2))
    lost: list[str] = []
    async with trio.open_nursery() as nursery:
        team = await ready_team(nursery, forks.workers, lost)
        watchdog = Watchdog(team, 1.0)
        nursery.start_soon(stop, team)
        # Stopping, with a worker that waits for a second STOP.
        await wait_until_async(lambda: team.stopping and slow.report.poems_served == 1)
        slow.last_heard = trio.current_time() - HOUR
        watchdog.ping()
        assert pending(notify) == ["WATCHDOG=1"]
        assert messages(records, logging.WARNING) == []
        slow.tell(link.STOP)
    assert slow.exit_code == 0


# -- Supervisor.hurry -------------------------------------------------------------------------


async def test_hurry_tells_every_living_worker_to_stop_again(
    forks: Forks, records: pytest.LogCaptureFixture
) -> None:
    quick = forks.worker(Script(stops=1))
    slow = [forks.worker(Script(stops=2)), forks.worker(Script(stops=2))]
    supervisor = Supervisor(ServeConfig(workers=3), forks.workers)
    async with trio.open_nursery() as nursery:
        await supervisor.build(None)
        await supervisor.application.start(nursery)
        with trio.fail_after(WAIT):
            await supervisor.team.all_ready()
        nursery.start_soon(supervisor.stop)
        # The first STOP has come to all; the quick one has gone, the slow ones wait.
        await wait_until_async(
            lambda: quick.exited.is_set() and quick.hung_up.is_set()
            and all(process.report.poems_served == 1 for process in slow)
        )
        supervisor.hurry("SIGTERM")
        with trio.fail_after(WAIT):
            for process in slow:
                await process.exited.wait()
    for process in slow:
        assert process.report.poems_served == 2, process
        assert process.exit_code == 0, process
    assert quick.report.poems_served == 1
    assert "received SIGTERM again: telling the workers not to wait any longer" in messages(records, logging.INFO)
    # Nothing was sent to the one that had gone (it would have found its end closed).
    assert not [m for m in messages(records, logging.DEBUG, "fastpoetry.link") if m.startswith("not sent")]


# -- _how_it_ended ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, ended",
    [
        (0, "exited with status 0"),
        (70, "exited with status 70"),
        (-9, "was killed by SIGKILL"),
        (-15, "was killed by SIGTERM"),
        (-40, "was killed by signal 40"),  # a real-time signal: no name in signal.Signals
    ],
)
def test_how_it_ended_says_the_status_or_the_signal(code: int, ended: str) -> None:
    if code == -40:  # else that case would prove nothing
        with pytest.raises(ValueError):
            signal.Signals(40)
    assert _how_it_ended(code) == ended


async def test_the_supervisor_is_a_service_tree_like_a_single_server() -> None:
    """Application > watchdog and status TimerServices around the Team, as app.py's tree has them."""
    supervisor = Supervisor(ServeConfig(workers=2), [])
    await supervisor.build(watchdog=1.0)
    assert isinstance(supervisor.application, Application)
    children = list(supervisor.application)
    assert [child.name for child in children] == ["watchdog", "workers", "status"]
    assert [type(child) for child in children] == [TimerService, Team, TimerService]
    assert supervisor.application.get("workers") is supervisor.team


async def test_the_supervisor_has_no_watchdog_timer_when_systemd_asks_for_none() -> None:
    supervisor = Supervisor(ServeConfig(workers=2), [])
    await supervisor.build(watchdog=None)
    assert [child.name for child in supervisor.application] == ["workers", "status"]

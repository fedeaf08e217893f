"""The main process of ``fastpoetry serve --workers N``: it starts the workers and supervises them.

One process serves on one core.  With ``--workers N`` the process systemd
started (the unit's main process) takes the sockets and reads every poem, as
a server on its own does, so that a bad configuration still fails once, with
exit status 1, before anything is forked.  Then it forks N workers
(:mod:`.worker`), before any event loop runs, and closes its copies of the
listening sockets: only the workers accept.

Every idle worker waits on the shared listening sockets with epoll,
registered with EPOLLEXCLUSIVE (:mod:`.acceptor`), so a new connection
wakes one of them, not all; should two race for it anyway, the loser's
``accept()`` finds nothing and it waits again.  The kernel balances the
load by itself.

The main process alone talks to systemd (the unit's ``NotifyAccess=main``
would refuse a worker): READY=1 once every worker serves, a STATUS= line
with what they served together, RELOADING=1 and STOPPING=1, and the
watchdog, pinged only while every worker reports in from its event loop.
A worker that dies unasked (a crash, ``kill -9``) makes it stop the others
and exit with status 70: systemd restarts the service, and the clients
wait in the sockets' queues meanwhile.

It is built from the parts a single server is built from: a service tree,
driven by :mod:`.lifecycle`::

    Application "fastpoetry"
      TimerService "watchdog"   (only when systemd asks for it)
      Team "workers"            (hears and watches every worker; stopping it stops them)
      TimerService "status"
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from . import app, exits, lifecycle, link, listeners, refusing, systemd, worker
from .lifecycle import Request, Requests
from .link import Link
from .options import ServeConfig
from .phrases import count, reason
from .report import TeamReporter, WorkerReport
from .service import Application, Service, TimerService

log = logging.getLogger(__name__)

#: How often a worker reports its counters to the main process, in seconds
#: (more often if the watchdog needs it): they are also its heartbeat.
REPORT_INTERVAL = 1.0


def run(config: ServeConfig) -> int:
    """Serve with ``config.workers`` processes; return the main process's exit status.

    :data:`.exits.OK` once every worker has shut down cleanly;
    :data:`.exits.FAILURE` when the server could not start (the reason is
    logged and given to systemd as STATUS=), and then no worker is left
    running; :data:`.exits.CRASH` when a worker died unasked.  Only the
    main process returns: a worker ends in :func:`os._exit`.
    """
    with lifecycle.signals_held():
        app.begin()
        control = None
        try:
            control = app.bind_control(config)
            prepared = app.prepare(config)
        except app.StartupError as exc:
            app.close_control(config, control)
            status = app.fail_to_start(exc)
            refusing.hold(exc.held)
            return status
        _warn_if_more_than_cores(config.workers)
        watchdog = systemd.watchdog_interval()
        heartbeat = REPORT_INTERVAL if watchdog is None else min(REPORT_INTERVAL, watchdog / 4)
        try:
            workers = _fork_workers(config, prepared, heartbeat, control)
        except app.StartupError as exc:
            app.close_control(config, control)
            return app.fail_to_start(exc)
        finally:
            # Only the workers accept; a socket systemd passed stays open in
            # systemd, and one bound here in the workers.
            listeners.close(prepared.sockets)
        pids = ", ".join(str(process.pid) for process in workers)
        log.info("started %s (PIDs %s)", count(len(workers), "worker"), pids)
        return trio.run(_supervise, config, workers, watchdog, control)


def _warn_if_more_than_cores(workers: int) -> None:
    cores = len(os.sched_getaffinity(0))
    if workers > cores:
        log.warning(
            "--workers %d is more than the %s this process may run on: the workers take turns",
            workers, count(cores, "core"),
        )


# -- starting the workers ----------------------------------------------------------


@dataclass(eq=False)
class WorkerProcess:
    """The main process's record of one worker."""

    number: int
    pid: int
    link: Link
    #: A descriptor that turns readable when the worker exits (pidfd_open(2)).
    pidfd: int
    report: WorkerReport = field(default_factory=WorkerReport)
    #: os.waitstatus_to_exitcode() of the worker, once it has exited.
    exit_code: int | None = None
    #: When the main process last heard from it (trio.current_time()).
    last_heard: float = 0.0
    exited: trio.Event = field(default_factory=trio.Event)
    #: Set once its end of the link has closed: everything it sent is in.
    hung_up: trio.Event = field(default_factory=trio.Event)
    _readies: trio.MemorySendChannel = field(init=False)
    _ready_queue: trio.MemoryReceiveChannel = field(init=False)

    def __post_init__(self) -> None:
        self._readies, self._ready_queue = trio.open_memory_channel(math.inf)

    def __str__(self) -> str:
        return f"worker {self.number} (PID {self.pid})"

    def said_ready(self) -> None:
        self._readies.send_nowait(None)

    async def next_ready(self) -> None:
        """Wait for the worker's next ``ready``: after its start, or a reload."""
        await self._ready_queue.receive()

    def tell(self, kind: str) -> None:
        """Send ``kind`` (:data:`.link.RELOAD` or :data:`.link.STOP`), warning if it cannot be."""
        if not self.link.send(kind):
            log.warning("could not send %r to %s: it does not read what it is sent", kind, self)

    def reap(self) -> int:
        """Collect the exit status of the worker, which has exited; return it."""
        _, status = os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        self.exit_code = os.waitstatus_to_exitcode(status)
        return self.exit_code

    def forget(self) -> None:
        """In another worker: close what the main process holds of this one."""
        self.link.close()
        os.close(self.pidfd)


def _fork_workers(
    config: ServeConfig, prepared: app.Prepared, heartbeat: float, control: socket.socket | None
) -> list[WorkerProcess]:
    """Fork ``config.workers`` workers; in each of them, never return.

    If one cannot be forked, those already running are stopped and waited
    for, and :exc:`.app.StartupError` says why.
    """
    started: list[WorkerProcess] = []
    for number in range(1, config.workers + 1):
        try:
            started.append(_fork(number, config, prepared, heartbeat, started, control))
        except OSError as exc:
            for process in started:
                process.link.send(link.STOP)
            for process in started:
                process.reap()
                process.link.close()
            raise app.StartupError(
                f"cannot start worker {number} of {config.workers}: {reason(exc)}"
            ) from None
    return started


def _fork(
    number: int,
    config: ServeConfig,
    prepared: app.Prepared,
    heartbeat: float,
    others: Sequence[WorkerProcess],
    control: socket.socket | None,
) -> WorkerProcess:
    ours, theirs = link.pair()
    try:
        # Whatever waits in a buffer now would be written by both processes.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
    except BaseException:
        ours.close()
        theirs.close()
        raise
    if pid == 0:

        def leave() -> None:
            ours.close()
            for other in others:
                other.forget()
            if control is not None:
                control.close()  # the main process's: it takes the reload requests

        worker.run(number, config, prepared, heartbeat, theirs, leave)
    theirs.close()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        # A worker that cannot be watched cannot be supervised either.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ours.close()
        raise
    return WorkerProcess(number, pid, ours, pidfd)


# -- the tree --------------------------------------------------------------------


class Team(Service):
    """The workers, as a service: hears what each says and watches it exit; stopping it stops them.

    ``lost`` is called when a worker exits unasked, with what happened.
    Stopping tells every worker still running to stop and waits until all
    have exited and everything they sent is in; each gives its poems in
    flight the shutdown timeout.
    """

    def __init__(self, workers: Sequence[WorkerProcess], lost: Callable[[str], None]) -> None:
        super().__init__("workers")
        self.workers = workers
        self.stopping = False
        self._lost = lost
        now = trio.current_time()
        for process in workers:
            process.last_heard = now

    @property
    def living(self) -> list[WorkerProcess]:
        return [process for process in self.workers if not process.exited.is_set()]

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        for process in self.workers:
            nursery.start_soon(self._listen, process)
            nursery.start_soon(self._watch, process)

    async def stop(self) -> None:
        await super().stop()
        self.stopping = True
        for process in self.living:
            process.tell(link.STOP)
        for process in self.workers:
            await process.exited.wait()
            # Its last report comes before the end of its link.
            await process.hung_up.wait()

    async def all_ready(self) -> None:
        """Wait until every worker has said ``ready`` once more: after the start, or a reload."""
        for process in self.workers:
            await process.next_ready()

    def tell_all(self, kind: str) -> None:
        """Send ``kind`` to every worker still running."""
        for process in self.living:
            process.tell(kind)

    async def _listen(self, process: WorkerProcess) -> None:
        """Take in what ``process`` says, until its end of the link closes."""
        try:
            while (message := await process.link.receive()) is not None:
                process.last_heard = trio.current_time()
                report = process.report
                if message["type"] not in (link.REPORT, link.READY):
                    raise ValueError(f"unknown message from {process}: {message!r}")
                report.poems_served = message["poems_served"]
                report.bytes_served = message["bytes_served"]
                report.poems_in_flight = message["poems_in_flight"]
                if message["type"] == link.READY:
                    report.serving = message["serving"]
                    report.reload_failure = message["reload_failure"]
                    process.said_ready()
        finally:
            process.hung_up.set()

    async def _watch(self, process: WorkerProcess) -> None:
        """Wait for ``process`` to exit; if it was not asked to, stop everything."""
        await trio.lowlevel.wait_readable(process.pidfd)
        code = process.reap()
        process.exited.set()
        if code == 0 and self.stopping:
            log.debug("%s has exited", process)
            return
        if code == 0:
            # It was sent SIGTERM itself: by systemctl stop, which signals
            # every process of the unit, or by hand.  Everything stops, cleanly.
            log.info("%s has shut down by itself: stopping the other workers", process)
            self._lost("")
            return
        ended = _how_it_ended(code)
        if self.stopping:
            log.error("%s %s", process, ended)
            return
        log.error("%s %s: stopping the other workers", process, ended)
        self._lost(f"{process} {ended}")


class Watchdog:
    """WATCHDOG=1 at every :meth:`ping`, unless a worker has not reported for ``interval``.

    A worker reports from its event loop several times per interval: one
    that stops doing so is stuck, and systemd should restart the service as
    it would a stuck server on its own.
    """

    def __init__(self, team: Team, interval: float) -> None:
        self.team = team
        self.interval = interval
        self._silent: set[WorkerProcess] = set()

    def ping(self) -> None:
        now = trio.current_time()
        late: set[WorkerProcess] = set()
        if not self.team.stopping:
            late = {p for p in self.team.workers if now - p.last_heard > self.interval}
        for process in self.team.workers:
            if process in late and process not in self._silent:
                log.warning(
                    "%s has not reported for %.1f s: not pinging the systemd watchdog",
                    process, now - process.last_heard,
                )
            elif process in self._silent and process not in late:
                log.info("%s reports again: pinging the systemd watchdog", process)
        self._silent = late
        if not late:
            systemd.notify_watchdog()


class Supervisor:
    """The main process's tree, as :mod:`.lifecycle` drives it (a :class:`.lifecycle.Runtime`)."""

    def __init__(self, config: ServeConfig, workers: Sequence[WorkerProcess]) -> None:
        self.config = config
        self.reporter = TeamReporter([process.report for process in workers])
        self.team = Team(workers, self._lost)
        self.application = Application("fastpoetry")
        # Cancelled when a worker exits unasked: then everything stops.
        self._serving = trio.CancelScope()
        #: Why the workers are being stopped, when it is not a request.
        self._failure: str | None = None

    async def build(self, watchdog: float | None) -> None:
        """Put the tree together (see the module's docstring)."""
        if watchdog is not None:
            log.info("pinging the systemd watchdog every %g s while every worker reports in", watchdog)
            pinger = Watchdog(self.team, watchdog)
            await self.application.add(TimerService(watchdog, pinger.ping, name="watchdog"))
        await self.application.add(self.team)
        status = TimerService(self.reporter.interval, self.reporter.update_status, name="status", now=False)
        await self.application.add(status)

    async def run(self, nursery: trio.Nursery, requests: Requests) -> int:
        """Supervise until every worker has exited; return the exit status."""
        await self.application.start(nursery)
        stops = 0
        with self._serving:
            await self.team.all_ready()
            self.reporter.ready()
            stops = await lifecycle.take_requests(self, requests)
        await lifecycle.shut_down(self, requests, stops)
        return exits.OK if self._clean() else exits.CRASH

    def _clean(self) -> bool:
        return all(process.exit_code == 0 for process in self.team.workers)

    def _lost(self, failure: str) -> None:
        if failure:
            self._failure = failure
        self._serving.cancel()

    async def reload(self, request: Request) -> str | None:
        """Have every worker re-read its poem files; READY=1 once all have.

        Returns why the reload failed in any worker (and in how many), or None.
        """
        poems = count(len(self.config.poems), "poem")
        workers = count(len(self.team.workers), "worker")
        log.info("received %s: reloading %s in %s", request.what, poems, workers)
        self.reporter.reloading()
        self.team.tell_all(link.RELOAD)
        await self.team.all_ready()
        self.reporter.ready()
        return self.reporter.reload_failure

    async def stop(self) -> None:
        """Stop every worker still running, and wait until all have exited."""
        self.team.stopping = True
        timeout = self.config.shutdown_timeout
        in_flight = count(self.reporter.poems_in_flight, "poem")
        workers = count(len(self.team.living), "worker")
        waiting = f"waiting up to {timeout:g} s for {in_flight} in flight"
        if self._failure is None:
            self.reporter.stopping(f"Shutting down {workers}, {waiting}")
        else:
            self.reporter.stopping(f"{self._failure[0].upper()}{self._failure[1:]}; stopping {workers}")
        log.info("shutting down: stopping %s, %s", workers, waiting)
        await self.application.stop()
        if self._clean():
            self.reporter.log_shut_down(f" with {count(len(self.team.workers), 'worker')}")

    def hurry(self, what: str) -> None:
        log.info("received %s again: telling the workers not to wait any longer", what)
        self.team.tell_all(link.STOP)


async def _supervise(
    config: ServeConfig, workers: list[WorkerProcess], watchdog: float | None, control: socket.socket | None
) -> int:
    with lifecycle.signal_receiver() as signals:
        send, requests = lifecycle.open_requests()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lifecycle.relay_signals, signals, send)
            # The main process alone takes reload requests, for all.
            await lifecycle.serve_control(control, config.control, nursery, send)
            supervisor = Supervisor(config, workers)
            await supervisor.build(watchdog)
            status = await supervisor.run(nursery, requests)
            nursery.cancel_scope.cancel()
    for process in workers:
        process.link.close()
    return status


def _how_it_ended(code: int) -> str:
    """``exited with status 70``, ``was killed by SIGKILL``."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"

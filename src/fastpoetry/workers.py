"""Several processes serving the same sockets: ``fastpoetry serve --workers N``.

One process serves on one core.  With ``--workers N`` the process systemd
started (the unit's main process) takes the sockets and reads every poem, as
a server on its own does, so that a bad configuration still fails once, with
exit status 1, before anything is forked.  Then it forks N workers, before
any event loop runs, and closes its copies of the listening sockets: only
the workers accept.  Each worker runs the serving tree of :mod:`.app` on the
sockets it inherited, starting with the poems the main process read.

Every idle worker waits on the shared listening sockets with epoll, so a new
connection wakes them all; one wins ``accept()``, and the others get EAGAIN,
which the accept loop takes as "nothing to do".  That costs a few system
calls per connection and buys a kernel that balances the load by itself.

The main process supervises, and alone talks to systemd (the unit's
``NotifyAccess=main`` would refuse a worker): READY=1 once every worker
serves, a STATUS= line with what they served together, RELOADING=1 and
STOPPING=1, and the watchdog, pinged only while every worker reports in from
its event loop.  A worker that dies unasked (a crash, ``kill -9``) makes it
stop the others and exit with status 70: systemd restarts the service, and
the clients wait in the sockets' queues meanwhile.

The main process and each worker talk over a socket pair (``AF_UNIX``,
``SOCK_SEQPACKET``), one small JSON object per packet.  A worker sends
``ready`` when it serves and after every reload (with the reload's failure,
if any), and a ``report`` of its counters every second, which is also its
heartbeat; the main process sends ``reload`` and ``stop``.  It does not
forward signals: ``systemctl stop`` sends SIGTERM to every process of the
unit at once (KillMode=control-group, the default) and Ctrl-C sends SIGINT
to the whole process group, so a worker would get the same request twice,
and a second request to stop means "stop waiting for poems in flight".  A
worker therefore counts requests to stop by origin (signals sent to it, the
main process, the main process going away): after the first, only a second
one of the same origin cuts its shutdown short.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from . import app, refusing, systemd
from .cli import EXIT_CRASH
from .poetry import PoetryService
from .proxy import ProxyService
from .report import Reporter, WorkerReport, WorkersReporter, count
from .stream import StreamServer

log = logging.getLogger(__name__)

#: How often a worker reports its counters to the main process, in seconds
#: (more often if the watchdog needs it): they are also its heartbeat.
REPORT_INTERVAL = 1.0

# Messages are a few hundred bytes; a reload failure names a file path.
_MAX_MESSAGE = 65536


def run(config: app.ServeConfig) -> int:
    """Serve with ``config.workers`` processes; return the main process's exit status.

    0 once every worker has shut down cleanly; 1 when the server could not
    start (the reason is logged and given to systemd as STATUS=), and then
    no worker is left running; 70 when a worker died unasked.  Only the
    main process returns: a worker ends in :func:`os._exit`.
    """
    with app.signals_held():
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
            team = _fork_workers(config, prepared, heartbeat, control)
        except app.StartupError as exc:
            app.close_control(config, control)
            return app.fail_to_start(exc)
        finally:
            # Only the workers accept; a socket systemd passed stays open in
            # systemd, and one bound here in the workers.
            for _, sock in prepared.sockets:
                sock.close()
        pids = ", ".join(str(worker.pid) for worker in team)
        log.info("started %s (PIDs %s)", count(len(team), "worker"), pids)
        return trio.run(_supervise, config, team, watchdog, control)


def _warn_if_more_than_cores(workers: int) -> None:
    cores = len(os.sched_getaffinity(0))
    if workers > cores:
        log.warning(
            "--workers %d is more than the %s this process may run on: the workers take turns",
            workers, count(cores, "core"),
        )


# -- the socket pair -----------------------------------------------------------


class _Link:
    """One end of the socket pair between the main process and a worker.

    Sending never waits: the other end reads all the time, and one that does
    not (a stuck process) must not stop this one too, so a message that does
    not fit is dropped and :meth:`send` says so.  Receiving waits.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    def send(self, kind: str, **fields: Any) -> bool:
        """Send a message of type ``kind``; False if dropped because the other end does not read.

        A message to a process that is gone is dropped silently: the
        receiving end notices that on its own.
        """
        try:
            self.sock.send(json.dumps({"type": kind, **fields}).encode())
        except BlockingIOError:
            return False
        except OSError as exc:
            log.debug("not sent: %r (%s)", kind, (exc.strerror or str(exc)).lower())
        return True

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None once the other end has closed, or died."""
        while True:
            try:
                data = self.sock.recv(_MAX_MESSAGE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError:
                return None
            if not data:
                return None
            message = json.loads(data)
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise ValueError(f"not a message: {data[:200]!r}")
            return message

    def close(self) -> None:
        self.sock.close()


# -- starting the workers ----------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    """The main process's record of one worker."""

    number: int
    pid: int
    link: _Link
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
    config: app.ServeConfig, prepared: app.Prepared, heartbeat: float, control: socket.socket | None
) -> list[_Worker]:
    """Fork ``config.workers`` workers; in each of them, never return.

    If one cannot be forked, those already running are stopped and waited
    for, and :exc:`app.StartupError` says why.
    """
    team: list[_Worker] = []
    for number in range(1, config.workers + 1):
        try:
            team.append(_fork(number, config, prepared, heartbeat, team, control))
        except OSError as exc:
            for worker in team:
                worker.link.send("stop")
            for worker in team:
                worker.reap()
                worker.link.close()
            reason = (exc.strerror or str(exc)).lower()
            raise app.StartupError(f"cannot start worker {number} of {config.workers}: {reason}") from None
    return team


def _fork(
    number: int,
    config: app.ServeConfig,
    prepared: app.Prepared,
    heartbeat: float,
    team: Sequence[_Worker],
    control: socket.socket | None,
) -> _Worker:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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
        if control is not None:
            control.close()  # the main process's: it takes the reload requests
        _be_worker(number, config, prepared, heartbeat, theirs, ours, team)
    theirs.close()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        # A worker that cannot be watched cannot be supervised either.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ours.close()
        raise
    return _Worker(number, pid, _Link(ours), pidfd)


# -- a worker ----------------------------------------------------------------------


def _be_worker(
    number: int,
    config: app.ServeConfig,
    prepared: app.Prepared,
    heartbeat: float,
    sock: socket.socket,
    main_end: socket.socket,
    others: Sequence[_Worker],
) -> NoReturn:
    """Serve in the forked process until told to stop, then end it.

    ``sock`` is the worker's end of its link; ``main_end`` (the other end)
    and what the main process holds of the ``others`` are closed here, so
    that a link ends when the process at its far end does.  It never returns
    into the main process's code: the exit status is 0 after a clean
    shutdown and 70 after a crash, whose traceback is logged.  The handled
    signals are still blocked, as they were at the fork; the worker's own
    signal receiver takes them.
    """
    status = EXIT_CRASH
    try:
        main_end.close()
        for other in others:
            other.forget()
        status = trio.run(_work, config, prepared, _Link(sock), heartbeat, os.getppid())
    except BaseException:
        log.critical("worker %d crashed", number, exc_info=True)
    finally:
        logging.shutdown()
        os._exit(status)


async def _work(
    config: app.ServeConfig, prepared: app.Prepared, link: _Link, heartbeat: float, main_pid: int
) -> int:
    reporters: list[_WorkerReporter] = []

    def reporter(
        poets: Sequence[PoetryService | ProxyService], servers: Sequence[StreamServer]
    ) -> Reporter:
        made = _WorkerReporter(poets, servers, link, heartbeat)
        reporters.append(made)
        return made

    with trio.open_signal_receiver(*app.SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, app.SIGNALS)
        send, receive = trio.open_memory_channel(math.inf)
        requests = _Requests(send, main_pid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(requests.relay_signals, signals)
            nursery.start_soon(requests.relay_main, link)
            status = await app.serve_prepared(config, prepared, nursery, receive, reporter)
            for made in reporters:
                made.update_status()  # what it served in the end, for the total
            nursery.cancel_scope.cancel()
    return status


class _WorkerReporter(Reporter):
    """A worker's reporter: what a server on its own tells systemd goes to the main process."""

    def __init__(
        self,
        poets: Sequence[PoetryService | ProxyService],
        servers: Sequence[StreamServer],
        link: _Link,
        interval: float,
    ) -> None:
        super().__init__(poets, servers)
        self.interval = interval
        self._link = link

    def ready(self) -> None:
        """After the start and after every reload: say so, and whether the reload failed."""
        sent = self._link.send(
            "ready", serving=self.serving(), reload_failure=self.reload_failure, **self._counts()
        )
        if not sent:
            log.warning("could not tell the main process that this worker is ready")
        log.debug("ready: told the main process")

    def update_status(self) -> None:
        # Sent from the event loop, so also a sign that the loop is alive.
        self._link.send("report", **self._counts())

    def _counts(self) -> dict[str, int]:
        return {
            "poems_served": self.poems_served,
            "bytes_served": self.bytes_served,
            "poems_in_flight": self.poems_in_flight,
        }

    def reloading(self) -> None:
        """The main process tells systemd."""

    def stopping(self, status: str) -> None:
        """The main process tells systemd."""


class _Requests:
    """Relays what a worker is asked to do into ``send``: from signals, and from the main process.

    After the first request to stop, one goes through only if its origin
    asked before (see the module's docstring).  SIGHUP sent to a worker is
    ignored: the main process reloads every worker.
    """

    def __init__(self, send: trio.MemorySendChannel, main_pid: int) -> None:
        self._send = send
        self._main_pid = main_pid
        self._stops: Counter[str] = Counter()

    def _stop(self, origin: str, what: str) -> None:
        self._stops[origin] += 1
        if self._stops[origin] == 1 and self._stops.total() > 1:
            log.debug("received %s: already shutting down", what)
            return
        self._send.send_nowait(app.Request(reload=False, what=what))

    async def relay_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info(
                    "ignoring SIGHUP: the main process (PID %d) reloads every worker when it gets one",
                    self._main_pid,
                )
                continue
            self._stop("signal", name)

    async def relay_main(self, link: _Link) -> None:
        while (message := await link.receive()) is not None:
            if message["type"] == "reload":
                what = "a reload request from the main process"
                self._send.send_nowait(app.Request(reload=True, what=what))
            elif message["type"] == "stop":
                self._stop("main", "a stop request from the main process")
            else:
                raise ValueError(f"unknown message from the main process: {message!r}")
        # The main process keeps its end open until this worker has exited.
        log.warning("the main process (PID %d) is gone", self._main_pid)
        self._stop("gone", "end of file from the main process")


# -- the main process --------------------------------------------------------------


async def _supervise(
    config: app.ServeConfig, team: list[_Worker], watchdog: float | None, control: socket.socket | None
) -> int:
    with trio.open_signal_receiver(*app.SIGNALS) as signals:
        # Signals held back since start-up are delivered now, to the receiver.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, app.SIGNALS)
        send, requests = app.open_requests()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.relay_signals, signals, send)
            # The main process alone takes reload requests, for all.
            await app.serve_control(config, control, nursery, send)
            status = await _Supervisor(config, team, requests).run(nursery, watchdog)
            nursery.cancel_scope.cancel()
    for worker in team:
        worker.link.close()
    return status


class _Supervisor:
    """The main process's event loop: readiness, reloads, shutdown, and deaths."""

    def __init__(
        self, config: app.ServeConfig, team: list[_Worker], requests: AsyncIterator[app.Request]
    ) -> None:
        self.config = config
        self.team = team
        self.requests = requests
        self.reporter = WorkersReporter([worker.report for worker in team])
        # Cancelled when a worker exits unasked: then everything stops.
        self._serving = trio.CancelScope()
        self._stopping = False
        # SIGTERMs and SIGINTs this process got: only its second ends the
        # workers' wait for poems in flight (see _pass_on_stops).
        self._stop_signals = 0
        #: Why the workers are being stopped, when it is not a signal.
        self._failure: str | None = None
        now = trio.current_time()
        for worker in team:
            worker.last_heard = now

    async def run(self, nursery: trio.Nursery, watchdog: float | None) -> int:
        """Supervise until every worker has exited; return the exit status."""
        for worker in self.team:
            nursery.start_soon(self._listen, worker)
            nursery.start_soon(self._watch, worker)
        nursery.start_soon(self._update_status)
        if watchdog is not None:
            log.info("pinging the systemd watchdog every %g s while every worker reports in", watchdog)
            nursery.start_soon(self._ping_watchdog, watchdog)
        with self._serving:
            for worker in self.team:
                await worker.next_ready()
            self.reporter.ready()
            async for request in self.requests:
                if request.reload:
                    if not request.given_up():
                        request.answer(await self._reload(request))
                    continue
                log.info("received %s: shutting down", request.what)
                self._stop_signals += 1
                break
        await self._stop_workers()
        clean = all(worker.exit_code == 0 for worker in self.team)
        if clean:
            served = self.reporter.poems_served
            log.info(
                "shut down after serving %s (%d bytes) with %s",
                count(served, "poem"),
                self.reporter.bytes_served,
                count(len(self.team), "worker"),
                extra={"POEMS_TOTAL": served, "BYTES": self.reporter.bytes_served},
            )
        return 0 if clean else EXIT_CRASH

    async def _reload(self, request: app.Request) -> str | None:
        """Have every worker re-read its poem files; READY=1 once all have.

        Returns why the reload failed in any worker (and in how many), or None.
        """
        poems = count(len(self.config.poems), "poem")
        log.info("received %s: reloading %s in %s", request.what, poems, count(len(self.team), "worker"))
        self.reporter.reloading()
        for worker in self.team:
            self._tell(worker, "reload")
        for worker in self.team:
            await worker.next_ready()
        self.reporter.ready()
        return self.reporter.reload_failure

    async def _stop_workers(self) -> None:
        """Ask every worker still running to stop, and wait until all have exited.

        Each gives its poems in flight --shutdown-timeout seconds; another
        SIGTERM or SIGINT is passed on, to end their wait at once.
        """
        self._stopping = True
        living = [worker for worker in self.team if not worker.exited.is_set()]
        timeout = self.config.shutdown_timeout
        in_flight = count(self.reporter.poems_in_flight, "poem")
        workers = count(len(living), "worker")
        waiting = f"waiting up to {timeout:g} s for {in_flight} in flight"
        if self._failure is None:
            self.reporter.stopping(f"Shutting down {workers}, {waiting}")
        else:
            self.reporter.stopping(f"{self._failure[0].upper()}{self._failure[1:]}; stopping {workers}")
        log.info("shutting down: stopping %s, %s", workers, waiting)
        for worker in living:
            self._tell(worker, "stop")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pass_on_stops)
            for worker in self.team:
                await worker.exited.wait()
                # Its last report comes before the end of its link.
                await worker.hung_up.wait()
            nursery.cancel_scope.cancel()

    async def _pass_on_stops(self) -> None:
        """Pass a second SIGTERM or SIGINT on, as a second request to stop.

        The workers were sent one request each already.  The first signal
        may come only now: a worker signalled at the same moment (by
        ``systemctl stop``, say) may have shut down before this process got
        to its own signal, and that is no reason to hurry the others.
        """
        async for request in self.requests:
            name = request.what
            if request.reload:
                log.info("ignoring %s while shutting down", name)
                request.answer("the server is shutting down")
                continue
            self._stop_signals += 1
            if self._stop_signals == 1:
                log.info("received %s while shutting down already", name)
                continue
            log.info("received %s again: telling the workers not to wait any longer", name)
            for worker in self.team:
                if not worker.exited.is_set():
                    self._tell(worker, "stop")

    def _tell(self, worker: _Worker, kind: str) -> None:
        if not worker.link.send(kind):
            log.warning("could not send %r to %s: it does not read what it is sent", kind, worker)

    async def _listen(self, worker: _Worker) -> None:
        """Take in what ``worker`` says, until its end of the link closes."""
        try:
            while (message := await worker.link.receive()) is not None:
                worker.last_heard = trio.current_time()
                report = worker.report
                if message["type"] not in ("report", "ready"):
                    raise ValueError(f"unknown message from {worker}: {message!r}")
                report.poems_served = message["poems_served"]
                report.bytes_served = message["bytes_served"]
                report.poems_in_flight = message["poems_in_flight"]
                if message["type"] == "ready":
                    report.serving = message["serving"]
                    report.reload_failure = message["reload_failure"]
                    worker.said_ready()
        finally:
            worker.hung_up.set()

    async def _watch(self, worker: _Worker) -> None:
        """Wait for ``worker`` to exit; if it was not asked to, stop everything."""
        await trio.lowlevel.wait_readable(worker.pidfd)
        code = worker.reap()
        worker.exited.set()
        if code == 0 and self._stopping:
            log.debug("%s has exited", worker)
            return
        if code == 0:
            # It was sent SIGTERM itself: by systemctl stop, which signals
            # every process of the unit, or by hand.  Everything stops, cleanly.
            log.info("%s has shut down by itself: stopping the other workers", worker)
        else:
            ended = _how_it_ended(code)
            if self._stopping:
                log.error("%s %s", worker, ended)
            else:
                log.error("%s %s: stopping the other workers", worker, ended)
                self._failure = f"{worker} {ended}"
        self._serving.cancel()

    async def _update_status(self) -> None:
        while True:
            await trio.sleep(self.reporter.interval)
            self.reporter.update_status()

    async def _ping_watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every ``interval`` seconds, unless a worker has not reported for as long.

        A worker reports from its event loop several times per interval: one
        that stops doing so is stuck, and systemd should restart the service
        as it would a stuck server on its own.
        """
        silent: set[_Worker] = set()
        while True:
            now = trio.current_time()
            late = set()
            if not self._stopping:
                late = {worker for worker in self.team if now - worker.last_heard > interval}
            for worker in self.team:
                if worker in late and worker not in silent:
                    log.warning(
                        "%s has not reported for %.1f s: not pinging the systemd watchdog",
                        worker, now - worker.last_heard,
                    )
                elif worker in silent and worker not in late:
                    log.info("%s reports again: pinging the systemd watchdog", worker)
            silent = late
            if not late:
                systemd.notify_watchdog()
            await trio.sleep(interval)


def _how_it_ended(code: int) -> str:
    """``exited with status 70``, ``was killed by SIGKILL``."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"

"""Putting the service tree together and running it until told to stop.

The tree, as the Twisted tutorial's fast poetry server had it, one level
deeper so that several poems can be served side by side::

    Application "fastpoetry"
      TimerService "watchdog"        (only when systemd asks for it)
      MultiService "poem:LABEL"      (one per --poem, or the proxy's upstream)
        PoetryService "poetry"       (or ProxyService "proxy": fetches and caches)
        StreamServer "stream"        (the sockets serving this poem)
      TimerService "status"
      TimerService "summary"

Start-up reads every poem and takes every socket before READY=1; SIGHUP,
or a request on the control socket (:mod:`.control`, which also gets the
outcome back), reloads the poems; SIGTERM or SIGINT stops accepting and
lets the poems in flight finish within the shutdown timeout.

With ``serve --workers N`` each worker process runs this tree too, on the
sockets and poems its main process took and read (:func:`prepare`), and is
asked to reload or stop by the main process instead of by signals alone;
:mod:`.workers` forks and supervises them.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import trio

from . import __version__, control, listeners, refusing, systemd
from .poetry import (
    DEFAULT_MAX_POEM_SIZE,
    DEFAULT_POEM_PATH,
    PoemError,
    PoetryService,
    read_poem,
)
from .proxy import ProxyService
from .report import Reporter, count
from .service import Application, MultiService, TimerService
from .stream import StreamServer

log = logging.getLogger(__name__)

#: The signals the server handles; they are blocked until it can (see run).
SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass(frozen=True)
class PoemSpec:
    """One --poem: a file, and the socket name it is served on (if any)."""

    path: str
    name: str | None = None


@dataclass(frozen=True)
class UpstreamSpec:
    """The proxy's poem: another poetry server's, fetched and cached."""

    host: str
    port: int
    timeout: float = 10.0
    refresh: float = 60.0
    #: Upstreams serve the sockets no poem is named for, as an unnamed poem.
    name: None = None


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``fastpoetry serve`` was told on its command line."""

    poems: Sequence[PoemSpec | UpstreamSpec] = field(
        default_factory=lambda: [PoemSpec(DEFAULT_POEM_PATH)]
    )
    #: Where to listen without socket activation; localhost is 127.0.0.1
    #: and ::1, never looked up (listeners.bind).
    iface: str = "localhost"
    port: int = 10000
    #: Ports of named poems without socket activation: ``{NAME: port}``.
    named_ports: Mapping[str, int] = field(default_factory=dict)
    shutdown_timeout: float = 5.0
    send_timeout: float = 30.0
    #: Keep every client until it closes (--linger always), not only those with something at stake.
    always_linger: bool = False
    max_poem_size: int = DEFAULT_MAX_POEM_SIZE
    summary_interval: float = 60.0
    #: Processes serving side by side (``serve --workers``); 1 is this one alone.
    workers: int = 1
    #: The control socket to take reload requests on (:mod:`.control`), or None.
    control: str | None = None


class StartupError(Exception):
    """The server cannot start; the message says why in one line.

    ``held`` are the listening sockets, still open, when clients were found
    waiting on them: the caller turns away those that arrive next for a
    while (:func:`.refusing.hold`) before it exits.
    """

    def __init__(self, message: str, held: Sequence[socket.socket] = ()) -> None:
        super().__init__(message)
        self.held = list(held)


@dataclass(frozen=True)
class Request:
    """A request to reload the poems or to stop, and what brought it."""

    reload: bool
    #: What came, as the log names it: ``SIGTERM``, ``a stop request from ...``.
    what: str
    #: Where a reload's outcome goes, when someone waits for it (the control socket).
    outcome: control.Outcome | None = None

    def answer(self, failure: str | None) -> None:
        """Tell whoever waits how the request ended: None for success, else why not."""
        if self.outcome is not None:
            self.outcome.set(failure)

    def given_up(self) -> bool:
        """Whether the request is to be dropped: whoever asked has stopped waiting (see :mod:`.control`).

        Answers it if so.
        """
        if self.outcome is None or not self.outcome.asker_gone():
            return False
        log.warning(
            "not reloading for %s: it has given up waiting (under systemd: the reload "
            "took longer than the unit's TimeoutStartSec=, and systemd said it failed)",
            self.what,
        )
        self.outcome.set(control.GONE)
        return True


def open_requests() -> tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel]:
    """The channel that brings a server its requests, from signals and the control
    socket, in the order they came."""
    return trio.open_memory_channel(math.inf)


async def relay_signals(signals: AsyncIterator[int], send: trio.MemorySendChannel) -> None:
    """Pass the handled signals on as requests: SIGHUP reloads, SIGTERM and SIGINT stop."""
    async for signum in signals:
        send.send_nowait(Request(reload=signum == signal.SIGHUP, what=signal.Signals(signum).name))


def bind_control(config: ServeConfig) -> socket.socket | None:
    """The control socket ``config.control`` asks for, listening; None if it asks for none.

    Made before the listening sockets are taken.  Raises :exc:`StartupError`
    when it cannot be made, with the sockets systemd passed to hold if
    clients were waiting on them (:func:`.refusing.take_waiting`).
    """
    if config.control is None:
        return None
    try:
        return control.bind(config.control)
    except control.ControlError as exc:
        raise StartupError(str(exc), held=refusing.take_waiting()) from None


def close_control(config: ServeConfig, sock: socket.socket | None) -> None:
    """Close and remove the control socket of a start that failed after :func:`bind_control`."""
    if sock is None or config.control is None:
        return
    sock.close()
    with suppress(OSError):
        os.unlink(config.control)


async def serve_control(
    config: ServeConfig, sock: socket.socket | None, nursery: trio.Nursery, send: trio.MemorySendChannel
) -> None:
    """Take reload requests on ``sock`` (from :func:`bind_control`) into ``send``."""
    if sock is None or config.control is None:
        return

    def submit(what: str, outcome: control.Outcome) -> None:
        send.send_nowait(Request(reload=True, what=what, outcome=outcome))

    await nursery.start(control.serve, sock, config.control, submit)
    log.info("taking reload requests on %s", config.control)


@dataclass
class Prepared:
    """What the main process takes and reads for its workers before it forks them."""

    #: The listening sockets with their names, as :func:`prepare` took them.
    sockets: list[tuple[str | None, socket.socket]]
    #: The poems of ``config.poems``, in that order.
    poems: list[bytes]


#: Makes the reporter of a tree from its poem sources and stream servers.
ReporterFactory = Callable[[Sequence[PoetryService | ProxyService], Sequence[StreamServer]], Reporter]


@dataclass
class _Server:
    """The running tree and the parts the runner talks to."""

    application: Application
    poets: list[PoetryService]
    proxies: list[ProxyService]
    reporter: Reporter


def block_signals() -> None:
    """Hold the handled signals until :func:`run` is ready for them.

    Called as early as possible: a SIGTERM or SIGHUP that arrives while the
    server is still starting then waits for it instead of killing it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def run(config: ServeConfig) -> int:
    """Serve poems in this process until SIGTERM or SIGINT; return the exit status.

    0 after a clean shutdown, 1 when the server could not start (the reason
    is logged and given to systemd as STATUS=; clients found waiting are
    turned away, and so are those that arrive for a while, see
    :mod:`.refusing`).
    """
    with signals_held():
        status, held = trio.run(_serve, config)
        # Outside the event loop, whose signal receiver is closed by now:
        # the hold takes the stop signals itself.
        refusing.hold(held)
        return status


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold the handled signals for an event loop's signal receiver to take.

    They stay blocked (a process forked meanwhile starts with them blocked
    too) until a receiver unblocks them; signals that come once serving is
    over are ignored.
    """
    block_signals()
    # A signal that comes while the process exits must not kill it, in any
    # thread. The receiver puts back the handlers it found when it closes:
    # finding this one, not the default action, covers the way out of the
    # event loop. SIG_IGN would also drop the signals held back during
    # start-up, so it is only set once serving is over; the interpreter
    # resets Python handlers to the default action when it finalizes, but
    # leaves SIG_IGN alone.
    for signum in SIGNALS:
        signal.signal(signum, _ignore_late_signal)
    try:
        yield
    finally:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _ignore_late_signal(signum: int, frame: object) -> None:
    """Handler for the signals that arrive once serving is over."""


async def _serve(config: ServeConfig) -> tuple[int, list[socket.socket]]:
    """Serve until stopped; the exit status, and the sockets to hold if the start failed."""
    with trio.open_signal_receiver(*SIGNALS) as signals:
        # Signals held back since start-up are delivered now, to the receiver.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        send, requests = open_requests()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay_signals, signals, send)
            try:
                status = await _run_until_stopped(config, nursery, send, requests)
            except StartupError as exc:
                status = fail_to_start(exc)
                held = exc.held
            else:
                held = []
            nursery.cancel_scope.cancel()
        return status, held


async def _run_until_stopped(
    config: ServeConfig,
    nursery: trio.Nursery,
    send: trio.MemorySendChannel,
    requests: AsyncIterator[Request],
) -> int:
    begin()
    sock = bind_control(config)
    try:
        server = await _start(config, nursery)
    except BaseException:
        close_control(config, sock)
        raise
    await serve_control(config, sock, nursery, send)
    await _serve_until_stopped(server, config.shutdown_timeout, requests)
    return 0


async def serve_prepared(
    config: ServeConfig,
    prepared: Prepared,
    nursery: trio.Nursery,
    requests: AsyncIterator[Request],
    reporter: ReporterFactory,
) -> int:
    """Serve as a worker: the tree on ``prepared``, until ``requests`` stops it.

    The sockets and poems are the ones the main process took and read: the
    first poem served is the one it checked, even if the file changed since.
    ``reporter`` makes the tree's reporter, which says where readiness and
    status go.  There is no watchdog timer: the main process pings it.
    Returns 0 after a clean shutdown; every socket is closed on the way out.
    """
    server = await _start(config, nursery, prepared=prepared, reporter=reporter)
    await _serve_until_stopped(server, config.shutdown_timeout, requests)
    return 0


def begin() -> None:
    """What every start does first: say so, warn about root, lift the descriptor limit."""
    log.info("fastpoetry %s starting", __version__)
    if os.geteuid() == 0:
        log.warning(
            "running as root: fastpoetry needs no privileges; "
            "run it as a service user (User= in its systemd unit)"
        )
    _raise_open_files_limit()


def fail_to_start(exc: StartupError) -> int:
    """Say why the server cannot start, in the log and to systemd; return the exit status."""
    log.error("%s", exc)
    systemd.notify_status(f"Failed to start: {exc}")
    return 1


async def _serve_until_stopped(
    server: _Server, shutdown_timeout: float, requests: AsyncIterator[Request]
) -> None:
    server.reporter.ready()
    async for request in requests:
        if request.reload:
            if not request.given_up():
                request.answer(await _reload(server, request))
            continue
        log.info("received %s: shutting down", request.what)
        break
    await _shut_down(server, shutdown_timeout, requests)


def _raise_open_files_limit() -> None:
    """Lift the soft limit on open descriptors to the hard limit.

    Every client holds a descriptor until it closes. systemd.exec(5) gives
    services a soft RLIMIT_NOFILE of 1024, for the sake of programs that use
    select(), and asks the others to raise it themselves; trio polls with
    epoll, so the hard limit (LimitNOFILE= in the unit) is the real bound.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
        return
    log.debug("raised the open files limit from %d to %d", soft, hard)


async def _start(
    config: ServeConfig,
    nursery: trio.Nursery,
    *,
    prepared: Prepared | None = None,
    reporter: ReporterFactory = Reporter,
) -> _Server:
    """Take the sockets, build the tree, read the poems, start serving.

    With ``prepared``, its sockets and poems are used instead.  On failure
    whatever had started is stopped and every socket closed.
    """
    sockets = _listening_sockets(config) if prepared is None else prepared.sockets
    server = None
    try:
        poems = None if prepared is None else prepared.poems
        server = await _build(config, sockets, poems=poems, reporter=reporter)
        await server.application.start(nursery)
    except BaseException as exc:
        if server is not None:
            with trio.CancelScope(shield=True):
                await server.application.stop()
        _give_up(sockets, exc)
        raise
    return server


def prepare(config: ServeConfig) -> Prepared:
    """Take the sockets and read every poem file, without an event loop.

    What the main process of ``serve --workers`` does before it forks: any
    error of the configuration shows here, once, as :exc:`StartupError`,
    with the clients already waiting turned away and the sockets closed, as
    at a start without workers.  Poem files only: a proxy has no workers.
    """
    sockets = _listening_sockets(config)
    try:
        _assign(config.poems, sockets)
        poems = []
        for spec in config.poems:
            if not isinstance(spec, PoemSpec):
                raise TypeError(f"workers serve poem files, not {spec!r}")
            poems.append(read_poem(spec.path, config.max_poem_size))
    except BaseException as exc:
        _give_up(sockets, exc)
        raise
    return Prepared(sockets, poems)


def _give_up(sockets: list[tuple[str | None, socket.socket]], exc: BaseException) -> None:
    """Close ``sockets`` after ``exc`` stopped the start; a bad poem becomes a StartupError.

    A configuration error is not retried (exit 1): the clients that are
    waiting would wait in vain, and would make systemd start us again and
    again, so they are turned away; if there were any, the sockets stay
    open in the StartupError, to turn away those that come next for a
    while (:mod:`.refusing`). After a crash systemd restarts the service,
    which serves them.
    """
    if not isinstance(exc, (PoemError, StartupError)):
        for _, sock in sockets:
            sock.close()
        return
    held = refusing.turn_away_waiting([sock for _, sock in sockets])
    if held or isinstance(exc, PoemError):
        raise StartupError(str(exc), held=held) from None


def _listening_sockets(config: ServeConfig) -> list[tuple[str | None, socket.socket]]:
    """The sockets to serve on, with their names: systemd's, or our own."""
    try:
        passed = systemd.listen_sockets()
    except systemd.ActivationError as exc:
        raise StartupError(str(exc)) from None
    if not passed:
        return _bind_ports(config)
    adopted: list[tuple[str | None, socket.socket]] = []
    try:
        for fd, name in passed.items():
            adopted.append((name, listeners.adopt(fd)))
    except listeners.ListenerError as exc:
        for _, sock in adopted:
            sock.close()
        raise StartupError(f"socket {name!r} passed by systemd: {exc}") from None
    log.info("took %s from systemd", count(len(adopted), "socket"))
    return adopted


def _bind_ports(config: ServeConfig) -> list[tuple[str | None, socket.socket]]:
    """Without systemd: listen on --port for the unnamed poem, --port NAME=N for NAME.

    When every poem has a name, the unnamed port is not bound: nothing
    would be served there.
    """
    wanted: list[tuple[str | None, int]] = list(config.named_ports.items())
    if any(spec.name is None for spec in config.poems) or not wanted:
        wanted.insert(0, (None, config.port))
    bound: list[tuple[str | None, socket.socket]] = []
    try:
        for name, port in wanted:
            bound.extend((name, sock) for sock in listeners.bind(config.iface, port))
    except listeners.ListenerError as exc:
        for _, sock in bound:
            sock.close()
        raise StartupError(str(exc)) from None
    return bound


def _assign(
    poems: Sequence[PoemSpec | UpstreamSpec], sockets: list[tuple[str | None, socket.socket]]
) -> list[list[socket.socket]]:
    """Which sockets serve which poem, in the order of ``poems``.

    A socket serves the poem of its name; any other socket the unnamed poem,
    or the only poem when there is just one.
    """
    by_name = {spec.name: index for index, spec in enumerate(poems) if spec.name is not None}
    unnamed = [index for index, spec in enumerate(poems) if spec.name is None]
    fallback: int | None = None
    if unnamed:
        fallback = unnamed[0]
    elif len(poems) == 1:
        fallback = 0
    assigned: list[list[socket.socket]] = [[] for _ in poems]
    for name, sock in sockets:
        index = by_name.get(name, fallback) if name is not None else fallback
        if index is None:
            where = listeners.describe(sock)
            if name is None:
                raise StartupError(f"no poem for {where}: give one --poem FILE without a name")
            raise StartupError(
                f"no poem for the socket named {name!r} ({where}): "
                f"give --poem {name}=FILE, or one --poem FILE without a name"
            )
        assigned[index].append(sock)
    return assigned


class _PreparedPoetryService(PoetryService):
    """A :class:`PoetryService` whose first read is the poem the main process read.

    A worker starts with the very bytes its main process checked before it
    forked, so every worker starts with the same poem; reloads read the file.
    """

    def __init__(self, spec: PoemSpec, poem: bytes, *, max_size: int) -> None:
        super().__init__(spec.path, spec.name, max_size=max_size)
        self._prepared: bytes | None = poem

    async def read(self) -> bytes:
        if self._prepared is not None:
            poem, self._prepared = self._prepared, None
            return poem
        return await super().read()


async def _build(
    config: ServeConfig,
    sockets: list[tuple[str | None, socket.socket]],
    *,
    poems: Sequence[bytes] | None = None,
    reporter: ReporterFactory = Reporter,
) -> _Server:
    """The tree for ``config`` on ``sockets``, not started yet.

    With ``poems`` (a worker's), those are the poems it starts with, and no
    watchdog is pinged: only the main process may, and does.
    """
    app = Application("fastpoetry")
    interval = systemd.watchdog_interval() if poems is None else None
    if interval is not None:
        log.info("pinging the systemd watchdog every %g s", interval)
        await app.add(TimerService(interval, systemd.notify_watchdog, name="watchdog"))
    poets: list[PoetryService] = []
    proxies: list[ProxyService] = []
    servers: list[StreamServer] = []
    assignments = zip(config.poems, _assign(config.poems, sockets), strict=True)
    for index, (spec, assigned) in enumerate(assignments):
        source: PoetryService | ProxyService
        if isinstance(spec, UpstreamSpec):
            source = ProxyService(
                spec.host, spec.port, timeout=spec.timeout, refresh=spec.refresh,
                max_size=config.max_poem_size,
            )
            proxies.append(source)
        elif poems is not None:
            source = _PreparedPoetryService(spec, poems[index], max_size=config.max_poem_size)
            poets.append(source)
        else:
            source = PoetryService(spec.path, spec.name, max_size=config.max_poem_size)
            poets.append(source)
        group = MultiService(f"poem:{source.label}")
        await group.add(source)
        if assigned:
            server = StreamServer(
                source, assigned, send_timeout=config.send_timeout,
                always_linger=config.always_linger,
            )
            await group.add(server)
            servers.append(server)
        else:
            log.warning(
                "no socket is named %r (FileDescriptorName=, or --port %s=N): %s is not served",
                spec.name, spec.name, source.label,
            )
        await app.add(group)
    tally = reporter([*poets, *proxies], servers)
    await app.add(TimerService(tally.interval, tally.update_status, name="status"))
    await app.add(
        TimerService(config.summary_interval, tally.log_summary, name="summary", now=False)
    )
    return _Server(app, poets, proxies, tally)


async def _reload(server: _Server, request: Request) -> str | None:
    """Re-read every poem file, and fetch from every upstream; return why it failed, or None.

    Poem files are replaced all or none: the new ones are served only if
    every one could be read. An upstream that fails keeps its cached poem.
    READY=1 is sent before this returns: whoever waits for the outcome
    hears of it only once systemd has.
    """
    log.info(
        "received %s: reloading %s",
        request.what,
        count(len(server.poets) + len(server.proxies), "poem"),
    )
    server.reporter.reloading()
    failures: list[str] = []
    try:
        fresh = [await poet.read() for poet in server.poets]
    except PoemError as exc:
        failures.append(str(exc))
        log.error("reload failed, still serving the poems loaded before: %s", exc)
    else:
        for poet, poem in zip(server.poets, fresh, strict=True):
            poet.use(poem)
    for proxy in server.proxies:
        # A failed fetch is logged by the proxy, and its cached poem stays.
        if not await proxy.refresh():
            failures.append(f"upstream {proxy.label}: {proxy.last_error}")
    server.reporter.reload_failure = "; ".join(failures) or None
    server.reporter.ready()
    return server.reporter.reload_failure


async def _shut_down(
    server: _Server, timeout: float, requests: AsyncIterator[Request]
) -> None:
    """Stop the tree, giving poems in flight ``timeout`` seconds to finish.

    A second request to stop (SIGTERM or SIGINT) ends the wait at once.
    """
    reporter = server.reporter
    waiting = f"waiting up to {timeout:g} s for {count(reporter.poems_in_flight, 'poem')} in flight"
    reporter.stopping(f"Shutting down, {waiting}")
    log.info("shutting down: accepting no more clients, %s", waiting)
    with trio.move_on_after(timeout) as grace:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cut_short_on_request, requests, grace)
            await server.application.stop()
            nursery.cancel_scope.cancel()
    if grace.cancelled_caught:
        log.warning("shutdown timeout: closed the connections still open")
    log.info(
        "shut down after serving %s (%d bytes)",
        count(reporter.poems_served, "poem"),
        reporter.bytes_served,
        extra={"POEMS_TOTAL": reporter.poems_served, "BYTES": reporter.bytes_served},
    )


async def _cut_short_on_request(
    requests: AsyncIterator[Request], grace: trio.CancelScope
) -> None:
    async for request in requests:
        if not request.reload:
            log.info("received %s again: not waiting any longer", request.what)
            grace.cancel()
            return
        log.info("ignoring %s while shutting down", request.what)
        request.answer("the server is shutting down")

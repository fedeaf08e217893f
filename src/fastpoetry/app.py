"""Putting the service tree together, starting it, and running it until told to stop.

The tree, as the Twisted tutorial's fast poetry server had it, one level
deeper so that several poems can be served side by side::

    Application "fastpoetry"
      TimerService "watchdog"        (only when systemd asks for it)
      MultiService "poem:LABEL"      (one per --poem, or the proxy's upstream)
        PoetryService "poetry"       (or ProxyService "proxy": fetches and caches)
        Credentials "tls"            (only over TLS: the certificate and key)
        StreamServer "stream"        (the sockets serving this poem)
      TimerService "status"
      TimerService "summary"

Start-up takes every socket (:func:`.listeners.acquire`) and reads every
poem before READY=1; then :mod:`.lifecycle` takes the requests to reload
(which finds every poem source through the tree) and to stop.

With ``serve --workers N`` each worker process runs this tree too, on the
sockets and poems its main process took and read (:func:`prepare`), and is
asked to reload or stop by the main process as well as by signals:
:mod:`.supervisor` forks and supervises them, :mod:`.worker` is their side.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass

import trio

from . import __version__, control, exits, lifecycle, listeners, refusing, systemd
from .lifecycle import Request, Requests
from .listeners import NamedSocket
from .options import PoemSpec, ServeConfig, SourceSpec, UpstreamSpec, socket_name
from .phrases import count
from .poetry import PoemError, PoetryService, read_poem
from .proxy import ProxyService
from .report import Reporter, Source
from .service import Application, MultiService, TimerService
from .stream import StreamServer
from .tls import Credentials, CredentialsError, Loaded, load

log = logging.getLogger(__name__)

#: What a bad configuration file raises: a start fails with exit status 1,
#: a reload keeps what was loaded before.
_FILE_ERRORS = (PoemError, CredentialsError)


class StartupError(Exception):
    """The server cannot start; the message says why in one line.

    ``held`` are the listening sockets, still open, when clients were found
    waiting on them: the caller turns away those that arrive next for a
    while (:func:`.refusing.hold`) before it exits.
    """

    def __init__(self, message: str, held: Sequence[socket.socket] = ()) -> None:
        super().__init__(message)
        self.held = list(held)


#: Makes the reporter of a tree from its poem sources and stream servers.
ReporterFactory = Callable[[Sequence[Source], Sequence[StreamServer]], Reporter]


@dataclass
class Prepared:
    """What the main process takes and reads for its workers before it forks them."""

    #: The listening sockets with their names, as :func:`prepare` took them.
    sockets: list[NamedSocket]
    #: The same sockets, one list per poem of ``config.poems`` (:func:`assign`).
    assigned: list[list[socket.socket]]
    #: The poems of ``config.poems``, in that order.
    poems: list[bytes]
    #: Their TLS certificates and keys, loaded; None for a poem served over plain TCP.
    tls: list[Loaded | None]


class Server:
    """A running tree, as :mod:`.lifecycle` drives it (a :class:`.lifecycle.Runtime`)."""

    def __init__(self, application: Application, reporter: Reporter, shutdown_timeout: float) -> None:
        self.application = application
        self.reporter = reporter
        self.shutdown_timeout = shutdown_timeout
        # The wait for poems in flight, once stopping: hurry() ends it.
        self._grace = trio.CancelScope()

    async def reload(self, request: Request) -> str | None:
        """Re-read every poem file and TLS pair, and fetch from every upstream; return why it failed, or None.

        Poem files and TLS certificates and keys are replaced all or none:
        the new ones are served only if every one could be read. An upstream
        that fails keeps its cached poem.
        READY=1 is sent before this returns: whoever waits for the outcome
        hears of it only once systemd has.
        """
        services = list(self.application.walk())
        files = [service for service in services if isinstance(service, PoetryService)]
        upstreams = [service for service in services if isinstance(service, ProxyService)]
        pairs = [service for service in services if isinstance(service, Credentials)]
        what = count(len(files) + len(upstreams), "poem")
        if pairs:
            what += f" and {count(len(pairs), 'TLS certificate')}"
        log.info("received %s: reloading %s", request.what, what)
        self.reporter.reloading()
        failures: list[str] = []
        try:
            fresh = [await source.read() for source in files]
            loaded = [await pair.read() for pair in pairs]
        except _FILE_ERRORS as exc:
            failures.append(str(exc))
            kept = "poems and TLS certificates" if pairs else "poems"
            log.error("reload failed, still serving the %s loaded before: %s", kept, exc)
        else:
            for source, poem in zip(files, fresh, strict=True):
                source.use(poem)
            for pair, both in zip(pairs, loaded, strict=True):
                pair.use(both)
        for upstream in upstreams:
            # A failed fetch is logged by the proxy, and its cached poem stays.
            if not await upstream.refresh():
                failures.append(f"upstream {upstream.label}: {upstream.last_error}")
        self.reporter.reload_failure = "; ".join(failures) or None
        self.reporter.ready()
        return self.reporter.reload_failure

    async def stop(self) -> None:
        """Stop the tree, giving poems in flight the shutdown timeout to finish."""
        reporter = self.reporter
        timeout = self.shutdown_timeout
        waiting = f"waiting up to {timeout:g} s for {count(reporter.poems_in_flight, 'poem')} in flight"
        reporter.stopping(f"Shutting down, {waiting}")
        log.info("shutting down: accepting no more clients, %s", waiting)
        with trio.move_on_after(timeout) as self._grace:
            await self.application.stop()
        if self._grace.cancelled_caught:
            log.warning("shutdown timeout: closed the connections still open")
        reporter.log_shut_down()

    def hurry(self, what: str) -> None:
        log.info("received %s again: not waiting any longer", what)
        self._grace.cancel()


def run(config: ServeConfig) -> int:
    """Serve poems in this process until SIGTERM or SIGINT; return the exit status.

    :data:`.exits.OK` after a clean shutdown, :data:`.exits.FAILURE` when
    the server could not start (the reason is logged and given to systemd
    as STATUS=; clients found waiting are turned away, and so are those
    that arrive for a while, see :mod:`.refusing`).
    """
    with lifecycle.signals_held():
        status, held = trio.run(_serve, config)
        # Outside the event loop, whose signal receiver is closed by now:
        # the hold takes the stop signals itself.
        refusing.hold(held)
        return status


async def _serve(config: ServeConfig) -> tuple[int, list[socket.socket]]:
    """Serve until stopped; the exit status, and the sockets to hold if the start failed."""
    with lifecycle.signal_receiver() as signals:
        send, requests = lifecycle.open_requests()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lifecycle.relay_signals, signals, send)
            held: list[socket.socket] = []
            try:
                begin()
                sock = bind_control(config)
                try:
                    server = await _start(config, nursery)
                except BaseException:
                    close_control(config, sock)
                    raise
                await lifecycle.serve_control(sock, config.control, nursery, send)
                await _serve_until_stopped(server, requests)
                status = exits.OK
            except StartupError as exc:
                status = fail_to_start(exc)
                held = exc.held
            nursery.cancel_scope.cancel()
        return status, held


async def serve_prepared(
    config: ServeConfig,
    prepared: Prepared,
    nursery: trio.Nursery,
    requests: Requests,
    reporter: ReporterFactory,
) -> int:
    """Serve as a worker: the tree on ``prepared``, until ``requests`` stops it.

    The sockets and poems are the ones the main process took and read: the
    first poem served is the one it checked, even if the file changed since.
    ``reporter`` makes the tree's reporter, which says where readiness and
    status go.  There is no watchdog timer: the main process pings it.
    Returns :data:`.exits.OK` after a clean shutdown; every socket is
    closed on the way out.
    """
    server = await _start(config, nursery, prepared=prepared, reporter=reporter)
    await _serve_until_stopped(server, requests)
    return exits.OK


async def _serve_until_stopped(server: Server, requests: Requests) -> None:
    server.reporter.ready()
    stops = await lifecycle.take_requests(server, requests)
    await lifecycle.shut_down(server, requests, stops)


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
    return exits.FAILURE


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


# -- the control socket --------------------------------------------------------------


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


# -- sockets and poems ------------------------------------------------------------


def take_sockets(config: ServeConfig) -> list[NamedSocket]:
    """The sockets to serve on, with their names (:func:`.listeners.acquire`); :exc:`StartupError` if none."""
    unnamed = None in config.socket_names
    try:
        return listeners.acquire(
            config.iface, config.port, config.named_ports, unnamed, defer_accept=config.header_socket_names
        )
    except (listeners.ListenerError, systemd.ActivationError) as exc:
        raise StartupError(str(exc)) from None


def assign(config: ServeConfig, sockets: Sequence[NamedSocket]) -> list[list[socket.socket]]:
    """Which sockets serve which poem of ``config`` (:func:`.listeners.assign`); :exc:`StartupError` if any serves none."""
    try:
        return listeners.assign(config.socket_names, sockets)
    except listeners.UnservedSocket as exc:
        if exc.name is None:
            raise StartupError(f"{exc}: give one --poem FILE without a name") from None
        raise StartupError(
            f"{exc}: give --poem {exc.name}=FILE, or one --poem FILE without a name"
        ) from None


def prepare(config: ServeConfig) -> Prepared:
    """Take the sockets and read every poem file, without an event loop.

    What the main process of ``serve --workers`` does before it forks: any
    error of the configuration shows here, once, as :exc:`StartupError`,
    with the clients already waiting turned away and the sockets closed, as
    at a start without workers.  Poem files only: a proxy has no workers.
    """
    sockets = take_sockets(config)
    try:
        assigned = assign(config, sockets)
        poems = []
        loaded: list[Loaded | None] = []
        for spec in config.poems:
            if not isinstance(spec, PoemSpec):
                raise TypeError(f"workers serve poem files, not {spec!r}")
            poems.append(read_poem(spec.path, config.max_poem_size))
            pair = config.tls_pair(spec)
            loaded.append(None if pair is None else load(pair.cert, pair.key))
    except BaseException as exc:
        give_up(sockets, exc)
        raise
    return Prepared(sockets, assigned, poems, loaded)


def give_up(sockets: list[NamedSocket], exc: BaseException) -> None:
    """Close ``sockets`` after ``exc`` stopped the start; a bad poem becomes a StartupError.

    A configuration error is not retried (exit 1): the clients that are
    waiting would wait in vain, and would make systemd start us again and
    again, so they are turned away; if there were any, the sockets stay
    open in the StartupError, to turn away those that come next for a
    while (:mod:`.refusing`). After a crash systemd restarts the service,
    which serves them.
    """
    if not isinstance(exc, (*_FILE_ERRORS, StartupError)):
        listeners.close(sockets)
        return
    held = refusing.turn_away_waiting([sock for _, sock in sockets])
    if held or isinstance(exc, _FILE_ERRORS):
        raise StartupError(str(exc), held=held) from None


# -- the tree ----------------------------------------------------------------------


async def _start(
    config: ServeConfig,
    nursery: trio.Nursery,
    *,
    prepared: Prepared | None = None,
    reporter: ReporterFactory = Reporter,
) -> Server:
    """Take the sockets, build the tree, read the poems, start serving.

    With ``prepared``, its sockets and poems are used instead.  On failure
    whatever had started is stopped and every socket closed.
    """
    sockets = take_sockets(config) if prepared is None else prepared.sockets
    server = None
    try:
        if prepared is None:
            server = await build(config, assign(config, sockets), reporter=reporter)
        else:
            server = await build(
                config, prepared.assigned, poems=prepared.poems, tls=prepared.tls, reporter=reporter
            )
        await server.application.start(nursery)
    except BaseException as exc:
        if server is not None:
            with trio.CancelScope(shield=True):
                await server.application.stop()
        give_up(sockets, exc)
        raise
    return server


async def build(
    config: ServeConfig,
    assigned: Sequence[list[socket.socket]],
    *,
    poems: Sequence[bytes] | None = None,
    tls: Sequence[Loaded | None] | None = None,
    reporter: ReporterFactory = Reporter,
) -> Server:
    """The tree for ``config``, each poem served on its sockets of ``assigned``, not started yet.

    With ``poems`` and ``tls`` (a worker's), those are the poems and TLS
    pairs it starts with, and no watchdog is pinged: only the main process
    may, and does.
    """
    app = Application("fastpoetry")
    interval = systemd.watchdog_interval() if poems is None else None
    if interval is not None:
        log.info("pinging the systemd watchdog every %g s", interval)
        await app.add(TimerService(interval, systemd.notify_watchdog, name="watchdog"))
    sources: list[PoetryService | ProxyService] = []
    servers: list[StreamServer] = []
    for index, (spec, its_sockets) in enumerate(zip(config.poems, assigned, strict=True)):
        source = _source(config, spec, None if poems is None else poems[index])
        sources.append(source)
        group = MultiService(f"poem:{source.label}")
        await group.add(source)
        pair = config.tls_pair(spec)
        credentials = None
        if pair is not None and its_sockets:
            credentials = Credentials(pair.cert, pair.key, first=None if tls is None else tls[index])
            await group.add(credentials)
        if its_sockets:
            server = StreamServer(
                source,
                its_sockets,
                send_timeout=config.send_timeout,
                always_linger=config.always_linger,
                proxy_protocol=config.expects_header(spec),
                header_timeout=config.header_timeout,
                tls=credentials,
                handshake_timeout=config.handshake_timeout,
            )
            await group.add(server)
            servers.append(server)
        else:
            name = socket_name(spec)
            log.warning(
                "no socket is named %r (FileDescriptorName=, or --port %s=N): %s is not served",
                name, name, source.label,
            )
        await app.add(group)
    announcer = reporter(sources, servers)
    await app.add(TimerService(announcer.interval, announcer.update_status, name="status"))
    await app.add(
        TimerService(config.summary_interval, announcer.log_summary, name="summary", now=False)
    )
    return Server(app, announcer, config.shutdown_timeout)


def _source(
    config: ServeConfig, spec: SourceSpec, first: bytes | None
) -> PoetryService | ProxyService:
    """The service that keeps the poem of ``spec``; ``first`` is a worker's prepared poem."""
    if isinstance(spec, UpstreamSpec):
        return ProxyService(
            spec.host, spec.port, timeout=spec.timeout, refresh=spec.refresh,
            max_size=config.max_poem_size,
        )
    return PoetryService(spec.path, spec.name, max_size=config.max_poem_size, first=first)

"""The poetry proxy's poem source: a poem fetched from another poetry server.

:class:`ProxyService` stands where a :class:`~.poetry.PoetryService` stands
in the tree and knows as little about serving clients: it fetches one whole
poem from an upstream server, the way any client of the protocol does,
keeps it, and fetches it again every ``refresh`` seconds.  Clients are
served the cached poem and never wait on the upstream; when the upstream
fails, the last good poem goes on being served.

A fetch takes the poem only when it is whole: the upstream ends a poem with
a clean end of stream, and a server that gives up part-way resets the
connection instead.  A reset, a timeout, or bytes that are not a poem (too
big, empty, not UTF-8, by the same rules as a poem file) fail the fetch and
leave the cache as it was.
"""

from __future__ import annotations

import functools
import logging

import trio

from .fetch import FetchFailed, Transfer, fetch_within
from .options import DEFAULT_MAX_POEM_SIZE
from .phrases import count, host_port
from .poetry import PoemError, check_poem
from .service import BackgroundTask, Service

log = logging.getLogger(__name__)

#: While no poem is cached, the first retry comes this many seconds after a
#: failed fetch; every further one waits twice as long, up to ``refresh``.
FIRST_RETRY = 1.0

#: A run of failed fetches is logged as a warning when it begins, then at
#: most once per this many seconds (the rest at debug level).
WARNING_INTERVAL = 300.0

# The longest backoff is refresh anyway; the cap only keeps 2 ** n a float.
_MAX_DOUBLINGS = 32


class ProxyService(Service):
    """Keeps the poem last fetched from the upstream at ``host``:``port``.

    The poem is fetched at start and then every ``refresh`` seconds; while
    none is cached the fetch is retried sooner, after 1, 2, 4... seconds (up
    to ``refresh``), so that the first poem comes soon after the upstream
    does.  A fetch takes at most ``timeout`` seconds in all, from resolving
    the name to the end of the poem.  Only one fetch runs at a time.

    The poem is replaced as a whole, as a :class:`~.poetry.PoetryService`
    replaces it: a reader that took :attr:`poem` keeps those bytes.

    Resources: one TCP connection during a fetch, and a task in the nursery
    given to :meth:`start` until :meth:`stop`.  Nothing the upstream does
    raises: failures are logged and kept in :attr:`last_error`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        refresh: float,
        max_size: int = DEFAULT_MAX_POEM_SIZE,
        name: str = "proxy",
    ) -> None:
        """:exc:`ValueError` if ``timeout`` or ``refresh`` is not positive."""
        if not timeout > 0 or not refresh > 0:
            raise ValueError(
                f"timeout and refresh must be positive, not {timeout!r} and {refresh!r}"
            )
        super().__init__(name)
        self.host = host
        self.port = port
        self.timeout = timeout
        # Not "refresh": that is the method SIGHUP calls.
        self.refresh_interval = refresh
        self.max_size = max_size
        #: When the last fetch succeeded, on trio's clock (trio.current_time());
        #: None until one has.
        self.fetched_at: float | None = None
        #: Why the last fetch failed; None when it succeeded (or none was made).
        self.last_error: str | None = None
        #: Fetches failed in a row since the last one that succeeded.
        self.failures = 0
        self._poem = b""
        self._failing_since = 0.0
        self._warned_at = 0.0
        self._next_fetch = 0.0
        self._lock = trio.Lock()
        self._task = BackgroundTask()

    @property
    def label(self) -> str:
        """How logs name this source: the upstream, ``HOST:PORT`` or ``[V6]:PORT``."""
        return host_port(self.host, self.port)

    @property
    def poem(self) -> bytes:
        """The cached poem; empty (``b""``) while none is cached."""
        return self._poem

    def status(self, sockets: str, served: str) -> str:
        """The status line: the poem it has, or why it has none, and the upstream's health."""
        if not self._poem:
            return f"Waiting for a poem from upstream {self.label}: {self.last_error or 'fetching'}; {served}"
        line = f"Serving the poem of upstream {self.label} ({len(self._poem)} bytes) on {sockets}; {served}"
        if self.last_error:
            line += f"; upstream failing: {self.last_error}"
        return line

    async def start(self, nursery: trio.Nursery) -> None:
        """Fetch a poem, then keep it fresh from a task in ``nursery``.

        The first fetch takes at most ``timeout`` seconds.  If it fails the
        reason is logged as a warning and the service starts all the same,
        with an empty :attr:`poem` until a retry brings one.
        """
        async with self._lock:
            await self._update(explicit=False)
        await super().start(nursery)
        await self._task.start(nursery, self._run)

    async def stop(self) -> None:
        """Stop refreshing; a fetch in progress is abandoned.  The poem stays."""
        await super().stop()
        await self._task.cancel()

    async def refresh(self) -> bool:
        """Fetch the poem now (on SIGHUP, say), after any fetch in progress.

        Returns True if the fetch succeeded: the poem fetched is cached
        (whether or not it changed).  On failure the old poem stays, the
        reason is logged as a warning (always: someone asked) and kept in
        :attr:`last_error`, and False is returned.  The next periodic
        fetch is counted from now.
        """
        async with self._lock:
            return await self._update(explicit=True)

    async def _run(self) -> None:
        while True:
            await trio.sleep_until(self._next_fetch)
            async with self._lock:
                # A refresh() while we slept or waited for the lock has
                # fetched already, and moved the next fetch (only later).
                if trio.current_time() >= self._next_fetch:
                    await self._update(explicit=False)

    async def _update(self, *, explicit: bool) -> bool:
        """Fetch, then cache and log the outcome; the caller holds the lock."""
        try:
            poem = await self._fetch()
        except FetchFailed as failure:
            self._failed(failure, explicit=explicit)
            return False
        self._fetched(poem)
        return True

    async def _fetch(self) -> bytes:
        """Read one whole poem from the upstream, within ``timeout``.

        Raises :exc:`.fetch.FetchFailed`; nothing else the upstream or the
        network does escapes.
        """
        reply = await fetch_within(self.host, self.port, self.max_size, self.timeout, Transfer())
        check = functools.partial(
            check_poem, reply, f"upstream {self.label}", self.max_size, what="the reply"
        )
        try:
            # Decoding megabytes would hold up the clients being served.
            return await trio.to_thread.run_sync(check)
        except PoemError as exc:
            raise FetchFailed(exc.reason, connected=True) from None

    def _fetched(self, poem: bytes) -> None:
        now = trio.current_time()
        fields = {"UPSTREAM": self.label, "BYTES": len(poem)}
        if self.failures:
            log.info(
                "upstream %s recovered after %s over %s",
                self.label,
                count(self.failures, "failed fetch", "failed fetches"),
                _duration(now - self._failing_since),
                extra=fields | {"FAILURES": self.failures},
            )
        changed = poem != self._poem
        if changed:
            self._poem = poem
        self.fetched_at = now
        self.last_error = None
        self.failures = 0
        self._next_fetch = now + self.refresh_interval
        if changed:
            log.info(
                "fetched a poem from upstream %s (%d bytes)", self.label, len(poem), extra=fields
            )
        else:
            log.debug(
                "upstream %s sent the same poem again (%d bytes)", self.label, len(poem), extra=fields
            )

    def _failed(self, failure: FetchFailed, *, explicit: bool) -> None:
        now = trio.current_time()
        self.failures += 1
        self.last_error = str(failure)
        if self.failures == 1:
            self._failing_since = now
        delay = self._retry_delay()
        self._next_fetch = now + delay
        # An upstream down for a day would otherwise write a warning every
        # refresh: say it when a run of failures begins and then once in a
        # while.  A refresh someone asked for is always answered.
        warn = explicit or self.failures == 1 or now - self._warned_at >= WARNING_INTERVAL
        if warn:
            self._warned_at = now
        level = logging.WARNING if warn else logging.DEBUG
        fields = {"UPSTREAM": self.label, "FAILURES": self.failures}
        if not self._poem or self.fetched_at is None:
            log.log(
                level,
                "no poem from upstream %s yet: %s; retrying in %g s",
                self.label,
                str(failure),
                delay,
                extra=fields | {"BYTES": 0},
            )
            return
        log.log(
            level,
            "upstream %s %s (%s); still serving the cached poem (%d bytes, fetched %s ago)",
            self.label,
            "sent no usable poem" if failure.connected else "is unreachable",
            str(failure),
            len(self._poem),
            _duration(now - self.fetched_at),
            extra=fields | {"BYTES": len(self._poem)},
        )

    def _retry_delay(self) -> float:
        """Seconds from a failed fetch to the next one."""
        if self._poem:
            # Clients are served meanwhile: no hurry.
            return self.refresh_interval
        doublings = min(self.failures - 1, _MAX_DOUBLINGS)
        return min(FIRST_RETRY * 2**doublings, self.refresh_interval)


def _duration(seconds: float) -> str:
    """``12 s``, ``5 min``, ``3 h``, ``2 days``: a duration for people."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"

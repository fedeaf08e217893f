"""What the server tells people about itself while it runs.

The STATUS= line that ``systemctl status`` shows, and a periodic summary in
the log.  Single connections are logged at debug level only: journald
rate-limits each service (10,000 messages in 30 s by default), and a busy
poetry server would hit that within a second.

A server of several processes (``serve --workers``) has a :class:`Reporter`
in every worker, whose announcements go to the main process instead of
systemd (:class:`.worker.LinkReporter`), and a :class:`TeamReporter` in the
main process, the supervisor, which adds up what the workers reported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from . import systemd
from .phrases import count
from .stream import StreamServer

log = logging.getLogger(__name__)

#: How often the STATUS= line is brought up to date, in seconds.
STATUS_INTERVAL = 5.0


class Source(Protocol):
    """A poem source as the status line shows it: a :class:`.poetry.PoetryService` or a proxy's."""

    @property
    def label(self) -> str: ...

    @property
    def poem(self) -> bytes: ...

    def status(self, sockets: str, served: str) -> str:
        """The status line when this is the only poem: ``sockets`` and ``served`` as counted."""
        ...


class _Announcer:
    """Tells systemd and the log how the server is doing, from :meth:`status`.

    Subclasses build the line; this class decides when systemd hears it.
    """

    #: How often :meth:`update_status` is to be called, in seconds.
    interval = STATUS_INTERVAL

    def __init__(self) -> None:
        # None until ready(): before that, systemd is told nothing.
        self._last_status: str | None = None

    def status(self) -> str:
        raise NotImplementedError

    def update_status(self) -> None:
        """Send the status line to systemd if it has changed since it was ready."""
        if self._last_status is None:
            return
        line = self.status()
        if line != self._last_status:
            self._last_status = line
            systemd.notify_status(line)

    def ready(self) -> None:
        """Tell systemd and the log that poems are being served (after a start or a reload)."""
        line = self.status()
        self._last_status = line
        systemd.notify_ready(line)
        log.info("ready: %s", line[0].lower() + line[1:])

    def reloading(self) -> None:
        """Tell systemd a reload has begun; :meth:`ready` says it is over."""
        systemd.notify_reloading()

    def stopping(self, status: str) -> None:
        """Tell systemd the server is shutting down, and what it waits for."""
        systemd.notify_stopping(status)

    @property
    def poems_served(self) -> int:
        raise NotImplementedError

    @property
    def bytes_served(self) -> int:
        raise NotImplementedError

    def log_shut_down(self, suffix: str = "") -> None:
        """Log the last line of a clean shutdown: what was served in all, then ``suffix``."""
        poems, size = self.poems_served, self.bytes_served
        log.info(
            "shut down after serving %s (%d bytes)%s",
            count(poems, "poem"),
            size,
            suffix,
            extra={"POEMS_TOTAL": poems, "BYTES": size},
        )


class Reporter(_Announcer):
    """Builds the status line and the summaries from the running services."""

    def __init__(self, sources: Sequence[Source], servers: Sequence[StreamServer]) -> None:
        super().__init__()
        self.sources = sources
        self.servers = servers
        #: Why the last reload failed, until a reload succeeds.
        self.reload_failure: str | None = None
        self._summarised_poems = 0
        self._summarised_bytes = 0

    @property
    def poems_served(self) -> int:
        return sum(server.poems_served for server in self.servers)

    @property
    def bytes_served(self) -> int:
        return sum(server.bytes_served for server in self.servers)

    @property
    def poems_in_flight(self) -> int:
        return sum(server.poems_in_flight for server in self.servers)

    @property
    def clients_lingering(self) -> int:
        """Clients that have their poem but have not closed yet: each holds a descriptor."""
        return sum(server.clients_lingering for server in self.servers)

    @property
    def headers_refused(self) -> int:
        """Connections reset for want of a valid PROXY protocol header, since the start."""
        return sum(server.headers_refused for server in self.servers)

    @property
    def handshakes_failed(self) -> int:
        """Connections dropped for a TLS handshake that failed or was too slow, since the start."""
        return sum(server.handshakes_failed for server in self.servers)

    def _sockets(self) -> str:
        return count(sum(len(server.listeners) for server in self.servers), "socket")

    def serving(self) -> str:
        """What poem files are served, where: ``Serving lantern.txt (812 bytes) on 1 socket``."""
        if len(self.sources) == 1:
            source = self.sources[0]
            return f"Serving {source.label} ({len(source.poem)} bytes) on {self._sockets()}"
        size = sum(len(source.poem) for source in self.sources)
        return f"Serving {count(len(self.sources), 'poem')} ({size} bytes) on {self._sockets()}"

    def status(self) -> str:
        """One line: which poem, how large, on how many sockets, how many served."""
        served = f"{count(self.poems_served, 'poem')} served"
        if len(self.sources) == 1:
            line = self.sources[0].status(self._sockets(), served)
        else:
            line = f"{self.serving()}; {served}"
        return _with_failure(line, self.reload_failure)

    def log_summary(self) -> None:
        """Log what was served since the last summary, if anything was."""
        poems, size = self.poems_served, self.bytes_served
        new_poems = poems - self._summarised_poems
        new_bytes = size - self._summarised_bytes
        if not new_poems:
            return
        self._summarised_poems, self._summarised_bytes = poems, size
        log.info(
            "served %s (%d bytes) since the last summary; %s in total",
            count(new_poems, "poem"),
            new_bytes,
            count(poems, "poem"),
            extra={
                "POEMS": new_poems,
                "BYTES": new_bytes,
                "POEMS_TOTAL": poems,
                "CLIENTS_LINGERING": self.clients_lingering,
                # Totals, each also in its own warning now and then: here
                # they can be followed over time (journalctl -o json).
                "HEADERS_REFUSED_TOTAL": self.headers_refused,
                "HANDSHAKES_FAILED_TOTAL": self.handshakes_failed,
            },
        )


@dataclass
class WorkerReport:
    """What the main process last heard from one of its workers."""

    #: The worker's :meth:`Reporter.serving`; empty until it is ready.
    serving: str = ""
    #: Why the worker's last reload failed, until one succeeds.
    reload_failure: str | None = None
    poems_served: int = 0
    bytes_served: int = 0
    poems_in_flight: int = 0


class TeamReporter(_Announcer):
    """The main process's status line, from what its workers reported.

    Every worker serves the same poem files on the same sockets, so the line
    says what the first one serves, with how many workers, and the poems they
    served together.  A reload failure shows as soon as any worker had one.
    """

    def __init__(self, reports: Sequence[WorkerReport]) -> None:
        super().__init__()
        self.reports = reports

    @property
    def poems_served(self) -> int:
        return sum(report.poems_served for report in self.reports)

    @property
    def bytes_served(self) -> int:
        return sum(report.bytes_served for report in self.reports)

    @property
    def poems_in_flight(self) -> int:
        return sum(report.poems_in_flight for report in self.reports)

    @property
    def reload_failure(self) -> str | None:
        """Why the last reload failed, in any worker (and in how many, if not all), or None."""
        failures = [report.reload_failure for report in self.reports if report.reload_failure]
        if not failures:
            return None
        if len(failures) == len(self.reports):
            return failures[0]
        # Each worker reads the files itself: one may have read a file
        # before it was changed, another after.
        return f"{failures[0]} (in {len(failures)} of {count(len(self.reports), 'worker')})"

    def status(self) -> str:
        """``Serving lantern.txt (812 bytes) on 1 socket with 2 workers; 7 poems served``."""
        workers = count(len(self.reports), "worker")
        line = f"{self.reports[0].serving} with {workers}; {count(self.poems_served, 'poem')} served"
        return _with_failure(line, self.reload_failure)


def _with_failure(line: str, failure: str | None) -> str:
    return f"{line}; last reload failed: {failure}" if failure else line

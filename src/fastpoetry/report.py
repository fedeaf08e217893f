"""What the server tells people about itself while it runs.

The STATUS= line that ``systemctl status`` shows, and a periodic summary in
the log.  Single connections are logged at debug level only: journald
rate-limits each service (10,000 messages in 30 s by default), and a busy
poetry server would hit that within a second.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from . import systemd
from .poetry import PoetryService
from .proxy import ProxyService
from .stream import StreamServer

log = logging.getLogger(__name__)

#: How often the STATUS= line is brought up to date, in seconds.
STATUS_INTERVAL = 5.0


def count(number: int, noun: str) -> str:
    """``1 poem``, ``2 poems``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


class Reporter:
    """Builds the status line and the summaries from the running services."""

    def __init__(
        self, poets: Sequence[PoetryService | ProxyService], servers: Sequence[StreamServer]
    ) -> None:
        self.poets = poets
        self.servers = servers
        #: Why the last reload failed, until a reload succeeds.
        self.reload_failure: str | None = None
        # None until ready(): before that, systemd is told nothing.
        self._last_status: str | None = None
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

    def status(self) -> str:
        """One line: which poem, how large, on how many sockets, how many served."""
        sockets = count(sum(len(server.listeners) for server in self.servers), "socket")
        served = f"{count(self.poems_served, 'poem')} served"
        if len(self.poets) == 1 and isinstance(self.poets[0], ProxyService):
            line = _proxy_status(self.poets[0], sockets, served)
        elif len(self.poets) == 1:
            poet = self.poets[0]
            line = f"Serving {poet.label} ({len(poet.poem)} bytes) on {sockets}; {served}"
        else:
            size = sum(len(poet.poem) for poet in self.poets)
            line = f"Serving {count(len(self.poets), 'poem')} ({size} bytes) on {sockets}; {served}"
        if self.reload_failure:
            line += f"; last reload failed: {self.reload_failure}"
        return line

    def update_status(self) -> None:
        """Send the status line to systemd if it has changed since it was ready."""
        if self._last_status is None:
            return
        line = self.status()
        if line != self._last_status:
            self._last_status = line
            systemd.notify_status(line)

    def ready(self) -> None:
        """Tell systemd and the log that poems are being served."""
        line = self.status()
        self._last_status = line
        systemd.notify_ready(line)
        log.info("ready: %s", line[0].lower() + line[1:])

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
            extra={"POEMS": new_poems, "BYTES": new_bytes, "POEMS_TOTAL": poems},
        )


def _proxy_status(proxy: ProxyService, sockets: str, served: str) -> str:
    """The proxy's line: the poem it has, or why it has none, and its upstream's health."""
    if not proxy.poem:
        return f"Waiting for a poem from upstream {proxy.label}: {proxy.last_error or 'fetching'}; {served}"
    line = f"Serving the poem of upstream {proxy.label} ({len(proxy.poem)} bytes) on {sockets}; {served}"
    if proxy.last_error:
        line += f"; upstream failing: {proxy.last_error}"
    return line

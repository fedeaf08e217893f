"""The link between the main process of ``serve --workers`` and one worker.

A socket pair (``AF_UNIX``, ``SOCK_SEQPACKET``) made before the fork, one
small JSON object per packet, each with a ``type``:

- the worker sends :data:`READY` when it serves and after every reload
  (what it serves, the reload's failure if any, and its counters), and
  :data:`REPORT` with its counters every heartbeat, which also tells the
  main process its event loop is alive;
- the main process sends :data:`RELOAD` and :data:`STOP`.

The end of the link is the end of the process at its far end: each side
closes every other end it inherited.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import trio

from .phrases import reason

log = logging.getLogger(__name__)

#: Message types, worker to main process.
READY, REPORT = "ready", "report"

#: Message types, main process to worker.
RELOAD, STOP = "reload", "stop"

# Messages are a few hundred bytes; a reload failure names a file path.
_MAX_MESSAGE = 65536


def pair() -> tuple[Link, socket.socket]:
    """A new link: the main process's end, and the socket the worker will wrap in its own :class:`Link`."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return Link(ours), theirs


class Link:
    """One end of the link.

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
            log.debug("not sent: %r (%s)", kind, reason(exc))
        return True

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None once the other end has closed, or died.

        :exc:`ValueError` for a packet that is not a message.
        """
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

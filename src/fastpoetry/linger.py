"""Closing connections without destroying the poem on its way out.

A socket closed while input it has not read is waiting is reset instead of
closed, and a reset throws away whatever the kernel still had to send
(RFC 1122, 4.2.2.13).  Poetry clients may send something (a newline, an
HTTP request) at any time, and the poem must survive it.  So a connection
that has its whole poem is shut down for writing, which lets the client see
the end of the poem, and then kept open, reading and discarding what the
client sends, until the client closes its side or a timeout passes.

One task watches every lingering socket through a private epoll instance,
so finishing a connection costs a few system calls and no task of its own.

Lingering is insurance, and most connections do not need it.  A poetry
client sends nothing, and on a nearby network it has acknowledged the whole
poem, and often the end of it, by the time the server asks.  Once the end
of the poem is on its way, the client has sent nothing and has acknowledged
every byte, a close cannot cost it anything: there is no input to turn the
close into a reset, and a reset provoked by a later write arrives after the
end of the poem, which a client has already received (Linux, like the BSDs,
still hands out what was received before a reset).  :func:`nothing_at_stake`
asks the kernel exactly that with one ``getsockopt(TCP_INFO)``; such a
connection is closed at once, the others linger.  One whose acknowledgement
was merely late (a busy machine) is asked again at every sweep and closed
as soon as nothing is at stake, rather than held until its client closes.
nginx's ``lingering_close on`` follows the same idea.  The price: a client
that starts writing only after it has the whole poem may see its writes
fail (EPIPE, or a reset).
"""

from __future__ import annotations

import _socket
import collections
import fcntl
import logging
import select
import socket
import struct
import sys
import termios

import trio

log = logging.getLogger(__name__)

#: How often sockets whose timeout has passed are closed, and sockets that
#: may close once acknowledged are asked again, in seconds.
SWEEP_INTERVAL = 1.0

#: While finishing, how often to look for sockets whose client has received
#: everything, in seconds.
FINISH_INTERVAL = 0.05

#: How much unwanted input is read from one client per wake-up, so that a
#: client streaming data cannot keep the closer from the others.
DRAIN_LIMIT = 16 * 65536

_WATCHED = select.EPOLLIN | select.EPOLLRDHUP

# The head of Linux's struct tcp_info (linux/tcp.h), as far as the two
# fields that say whether a close could cost the client anything:
# tcpi_bytes_acked at offset 120 and tcpi_bytes_received at 128 (Linux 4.1).
_TCP_INFO = struct.Struct("=120xQQ")


class LingeringCloser:
    """Closes sockets once their clients have closed, or after ``timeout``.

    :meth:`close_when_done` takes a socket whose write side is shut down,
    from any thread; :meth:`run` does the waiting and must be running for
    sockets to close.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._epoll = select.epoll()
        # Insertion order is deadline order, since every socket gets the same
        # timeout: the expired ones are always at the front.
        self._lingering: dict[int, tuple[_socket.socket, float]] = {}
        # Descriptor -> (bytes sent, bytes of input expected: a PROXY
        # protocol header), for the sockets that may close as soon as nothing
        # is at stake; a client's further input takes its socket out.
        self._awaiting_ack: dict[int, tuple[int, int]] = {}
        # Sockets handed over and not yet taken in by run(), which owns the
        # two dicts above: another thread may hand sockets over while run()
        # walks them, and a deque's append and popleft are atomic.
        self._arrivals: collections.deque[tuple[_socket.socket, int | None, int]] = collections.deque()
        self._next_ack_check = 0.0
        self._finishing = False
        self._wait = trio.CancelScope()

    def __len__(self) -> int:
        return len(self._lingering) + len(self._arrivals)

    def close_when_done(self, sock: _socket.socket, sent: int | None = None, expected_input: int = 0) -> None:
        """Close ``sock`` once its client has closed or the timeout passed.

        ``sent``: the bytes sent on a TCP socket that may also be closed as
        soon as nothing is at stake (:func:`nothing_at_stake`, with
        ``expected_input``), which is asked again at every sweep until the
        client sends something more.  ``None`` (the default) keeps it until
        its client closes.

        Safe to call from any thread.  The timeout runs from when
        :meth:`run` takes the socket in, at its next wake-up: at the latest
        SWEEP_INTERVAL later, the granularity of the timeout anyway.
        """
        try:
            self._epoll.register(sock.fileno(), _WATCHED)
        except (OSError, ValueError):  # ValueError: run() has ended
            sock.close()
            return
        self._arrivals.append((sock, sent, expected_input))

    def finish(self) -> None:
        """Let :meth:`run` return as soon as no socket is left.

        From now on a socket is also closed once the client has acknowledged
        every byte sent to it: nothing is left that a reset could destroy,
        and a client that keeps its end open cannot hold up a shutdown.
        """
        self._finishing = True
        self._wait.cancel()

    async def run(self) -> None:
        """Close sockets as their clients finish, until :meth:`finish`.

        Cancelling it closes every socket still lingering at once.
        """
        try:
            while self._lingering or not self._finishing:
                interval = FINISH_INTERVAL if self._finishing else SWEEP_INTERVAL
                with trio.move_on_after(interval) as self._wait:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                self._take_arrivals()
                self._close_finished()
                self._close_expired()
                if self._finishing:
                    self._close_acknowledged()
                elif self._awaiting_ack and trio.current_time() >= self._next_ack_check:
                    self._next_ack_check = trio.current_time() + SWEEP_INTERVAL
                    self._close_unstaked()
        finally:
            self._epoll.close()
            self._take_arrivals()
            for sock, _ in self._lingering.values():
                sock.close()
            self._lingering.clear()
            self._awaiting_ack.clear()

    def close_stragglers(self) -> None:
        """Close sockets handed over too late for :meth:`run` to take them in.

        For after :meth:`run` has ended and no thread hands sockets over any more.
        """
        while self._arrivals:
            self._arrivals.popleft()[0].close()

    def _take_arrivals(self) -> None:
        deadline = trio.current_time() + self.timeout
        while self._arrivals:
            sock, sent, expected_input = self._arrivals.popleft()
            fd = sock.fileno()
            self._lingering[fd] = (sock, deadline)
            if sent is not None:
                self._awaiting_ack[fd] = (sent, expected_input)

    def _close(self, fd: int) -> None:
        """Stop watching ``fd`` and close its socket."""
        sock, _ = self._lingering.pop(fd)
        # Its number may come back with the next connection accepted.
        self._awaiting_ack.pop(fd, None)
        sock.close()

    def _close_finished(self) -> None:
        for fd, _ in self._epoll.poll(0):
            entry = self._lingering.get(fd)
            if entry is None:
                continue
            if discard_input(entry[0]):
                self._close(fd)
            else:
                # The client has spoken: from now on a close could reset.
                self._awaiting_ack.pop(fd, None)

    def _close_unstaked(self) -> None:
        unstaked = [
            fd for fd, (sent, expected_input) in self._awaiting_ack.items()
            if nothing_at_stake(self._lingering[fd][0], sent, expected_input)
        ]
        for fd in unstaked:
            self._close(fd)

    def _close_acknowledged(self) -> None:
        acknowledged = [
            fd for fd, (sock, _) in self._lingering.items() if _unacknowledged(sock) == 0
        ]
        for fd in acknowledged:
            discard_input(self._lingering[fd][0])  # read what it sent, so closing does not reset
            self._close(fd)

    def _close_expired(self) -> None:
        now = trio.current_time()
        expired = []
        for fd, (_, deadline) in self._lingering.items():
            if deadline > now:
                break
            expired.append(fd)
        for fd in expired:
            log.debug("closing a connection whose client did not close within %g s", self.timeout)
            self._close(fd)


def nothing_at_stake(sock: _socket.socket, size: int, expected_input: int = 0) -> bool:
    """True if closing the TCP socket ``sock`` now cannot cost its client anything.

    ``size`` is how many bytes were sent on it, ``expected_input`` how many
    the client had to send first and the server has read (a PROXY protocol
    header).  Nothing is at stake when the client has sent nothing more (a
    close with unread input would be a reset) and has acknowledged every
    byte sent (a reset later cannot destroy what the client already has).
    False when the kernel cannot tell, e.g. one older than Linux 4.1, whose
    struct tcp_info is shorter.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    except OSError:
        return False
    if len(info) < _TCP_INFO.size:
        return False
    acknowledged, received = _TCP_INFO.unpack(info)
    # A FIN sent after the poem counts as one more byte once acknowledged.
    return received == expected_input and acknowledged >= size


def _unacknowledged(sock: _socket.socket) -> int:
    """Bytes sent on ``sock`` that the client has not acknowledged (SIOCOUTQ)."""
    try:
        out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    except OSError:
        return 0
    return int.from_bytes(out, sys.byteorder, signed=True)


def discard_input(sock: _socket.socket) -> bool:
    """Read and discard what the client sent, without waiting.

    True once the client has closed its end (or reset it): nothing more
    will come.  False when it may still send.
    """
    received = 0
    try:
        while received < DRAIN_LIMIT:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
            if not data:
                return True
            received += len(data)
    except BlockingIOError:
        return False
    except OSError:  # reset by the client: nothing left to protect
        return True
    return False

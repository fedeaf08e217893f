"""The reload exchange: ``fastpoetry reload`` asks a running server, and waits for its answer.

A server listens on an ``AF_UNIX`` stream socket, its control socket: by
default ``control`` in the folder systemd made for the unit
(``RuntimeDirectory=``), or where ``--control`` says.  A client connects,
sends one line, ``reload``, and gets one line back once the reload is over:
``ok``, or ``failed: REASON``.  That is what the units' ``ExecReload=``
runs, so ``systemctl reload`` returns only once the new poems are served,
and fails, with the reason, when they could not be loaded.

Requests are served one at a time, in the order they came, each by a reload
of its own that starts after it arrived: two reloads racing each other both
get a true answer.  A request that comes while the server shuts down is
answered ``failed``.  A request whose client has gone by the time its turn
comes is dropped, not carried out: systemd kills an ``ExecReload=`` that
outlasts ``TimeoutStartSec=`` and reports the reload failed, and a reload
done later anyway would make that report untrue.

The socket's file is made with the process's umask (the units' UMask=0077:
only the service's user, and root, may connect), and removed when the
server stops.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import trio

from . import exits
from .options import default_control_path
from .phrases import reason

log = logging.getLogger(__name__)

#: The only request there is.
RELOAD = b"reload\n"

#: The longest line either side sends: a reason names a file path.
_MAX_LINE = 65536

#: Connections waiting to be accepted: reload requests are rare.
_BACKLOG = 16

#: How long a client may take to send its request line, in seconds: a
#: connection that says nothing must not hold a handler for ever.
_REQUEST_TIMEOUT = 10.0

class ControlError(Exception):
    """The control socket cannot be used; the message says why in one line."""


class Outcome:
    """The answer to one reload request, given once by the server, awaited by the client's handler.

    ``asker_gone`` says whether the client has hung up meanwhile.
    """

    def __init__(self, asker_gone: Callable[[], bool] = lambda: False) -> None:
        self._done = trio.Event()
        self.failure: str | None = None
        self.asker_gone = asker_gone

    def set(self, failure: str | None) -> None:
        """Give the answer: None when the reload succeeded, else why it failed."""
        if not self._done.is_set():
            self.failure = failure
            self._done.set()

    async def wait(self) -> str | None:
        await self._done.wait()
        return self.failure


#: Hands a reload request to the server: what asked, and where the answer goes.
Submit = Callable[[str, Outcome], None]


def bind(path: str) -> socket.socket:
    """Listen on the control socket at ``path``, replacing a stale one.

    Raises :exc:`ControlError` when the path cannot be used: its folder
    is missing or read-only, another server answers there, or something
    that is not a socket is in the way.
    """
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot listen on the control socket {path}: {reason(exc)}") from None
    return sock


def _remove_stale(path: str) -> None:
    """Remove a socket left at ``path`` by a server that is gone.

    One that still answers belongs to a running server: two servers on one
    control socket could not both be asked, so that is an error.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"cannot use the control socket {path}: {reason(exc)}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"cannot use the control socket {path}: something else is there (not a socket)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            pass  # nobody listens: stale
        else:
            raise ControlError(f"cannot use the control socket {path}: another server listens on it")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def serve(
    sock: socket.socket,
    path: str,
    submit: Submit,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer reload requests on ``listener`` until cancelled.

    Arguments: the socket :func:`bind` made (this takes it over), its path,
    and ``submit``, which
    hands each request with its :class:`Outcome` to the server's request
    queue; the handler waits for the outcome and sends it back.

    Resources: each connection is closed once answered (or when cancelled);
    on the way out the listener is closed and its file removed.

    Errors: a client that sends something else, nothing within
    :data:`_REQUEST_TIMEOUT`, or goes away, is logged at debug level and
    dropped; accept errors other than running out of descriptors end the
    loop with a warning, and the server goes on serving poems.
    """
    listener = trio.socket.from_stdlib_socket(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        await trio.sleep(0.1)
                        continue
                    log.warning("control socket %s: %s; reload requests are no longer taken", path, reason(exc))
                    return
                nursery.start_soon(_answer, conn, submit)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _answer(conn: trio.socket.SocketType, submit: Submit) -> None:
    with conn:
        with trio.move_on_after(_REQUEST_TIMEOUT):
            request = await _read_line(conn)
        if request != RELOAD:
            log.debug("control socket: dropped a connection that sent %r", request)
            return
        what = f"a reload request from {_peer(conn)}"
        outcome = Outcome(lambda: _hung_up(conn))
        submit(what, outcome)
        failure = await outcome.wait()
        if outcome.asker_gone():
            if failure != GONE:
                log.warning("%s: the reload is done, but its client has given up waiting for it", what)
            return
        answer = b"ok\n" if failure is None else f"failed: {_one_line(failure)}\n".encode()
        try:
            await conn.send(answer)
        except OSError as exc:
            log.info("could not tell the reload's outcome to its client: %s", reason(exc))


#: The outcome of a request dropped because its client had gone.
GONE = "its client has given up waiting"


def _hung_up(conn: trio.socket.SocketType) -> bool:
    """Whether the client has closed its end (POLLRDHUP), without waiting."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


async def _read_line(conn: trio.socket.SocketType) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < len(RELOAD):
        try:
            chunk = await conn.recv(len(RELOAD) - len(data))
        except OSError:
            return data
        if not chunk:
            break
        data += chunk
    return data


def _peer(conn: trio.socket.SocketType) -> str:
    """``fastpoetry reload (PID 123, uid 0)``: who is asking, from the kernel (SO_PEERCRED)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return "the control socket"
    pid, uid, _ = struct.unpack("3i", creds)
    return f"PID {pid} (uid {uid})"


@dataclass(frozen=True)
class Answer:
    """What the server said: whether the reload succeeded, and why not."""

    ok: bool
    failure: str = ""


def request_reload(path: str, timeout: float | None = None) -> Answer:
    """Ask the server listening at ``path`` to reload; wait for its answer.

    Blocks until the answer comes, or ``timeout`` seconds (None: as long as
    it takes); a request given up on is dropped by the server.  Raises :exc:`ControlError` when no server answers: nothing
    listens there, the connection breaks, or the time is up.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no server at {path}: it does not exist (is the server running?)") from None
        except ConnectionRefusedError:
            raise ControlError(f"no server at {path}: nothing listens there (is the server running?)") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the server at {path}: {reason(exc)}") from None
        try:
            sock.sendall(RELOAD)
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < _MAX_LINE:
                chunk = sock.recv(_MAX_LINE)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError:
            raise ControlError(
                f"the server at {path} did not answer within {timeout:g} s; "
                "it goes on serving, and drops the request when it gets to it"
            ) from None
        except OSError as exc:
            raise ControlError(f"lost the connection to the server at {path}: {reason(exc)}") from None
    text = reply.decode(errors="replace").strip()
    if text == "ok":
        return Answer(True)
    if text.startswith("failed: "):
        return Answer(False, text.removeprefix("failed: "))
    if not text:
        raise ControlError(f"the server at {path} closed the connection without an answer (is it shutting down?)")
    raise ControlError(f"the server at {path} answered something else: {text[:200]!r}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(exc: OSError) -> str:
    return reason(exc)


class _Stopped(Exception):
    """SIGTERM came, from an administrator or a supervisor (systemd kills with SIGKILL)."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def main(path: str | None, timeout: float | None) -> int:
    """``fastpoetry reload``: ask, wait, and say how it went; return the exit status.

    Silent on success.  Otherwise one line on standard error (the journal,
    under systemd) says why: the reload's failure as the server gave it,
    no server at ``path``, or no answer in time.
    """
    path = path or default_control_path()
    if path is None:
        print(
            "fastpoetry reload: no --control PATH given, and no RUNTIME_DIRECTORY "
            "(it is set only under the server's unit)",
            file=sys.stderr,
        )
        return exits.USAGE
    signal.signal(signal.SIGTERM, _stop)
    try:
        answer = request_reload(path, timeout)
    except ControlError as exc:
        print(f"fastpoetry reload: {exc}", file=sys.stderr)
        return exits.FAILURE
    except _Stopped:
        print(
            f"fastpoetry reload: stopped by SIGTERM before the server at {path} answered; "
            "the server goes on serving, and drops the request when it gets to it",
            file=sys.stderr,
        )
        return exits.FAILURE
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    if answer.ok:
        return exits.OK
    print(f"fastpoetry reload: reload failed, still serving the poems loaded before: {answer.failure}",
          file=sys.stderr)
    return exits.FAILURE

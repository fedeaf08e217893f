"""The poetry client: ``fastpoetry get`` fetches poems and prints them.

Every server is contacted at once, and each poem is written to standard
output in the order the addresses were given, as soon as it and every poem
before it have arrived.  A poem counts only once its server has closed the
connection cleanly: a reset means the server abandoned the poem part-way,
so a failed server's bytes are never printed, only a line on standard
error that says what went wrong.

Poems are written exactly as received.  Between two poems a newline is
added when the first does not end with one, so that every poem starts on a
line of its own; nothing else is ever added, and the output for a single
address is the poem, byte for byte.
"""

from __future__ import annotations

import inspect
import os
import signal
import ssl
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TextIO

import trio

from . import exits
from .fetch import FetchFailed, Transfer, fetch_within
from .options import Address
from .phrases import count, reason
from .tls import CredentialsError, client_context

#: Poems go straight to the descriptor (see Output), not through sys.stdout.
STDOUT_FILENO = 1

#: How often the progress line is redrawn, in seconds; also how long a
#: fetch may take before any progress is shown at all, so that poems from
#: nearby servers do not make the terminal flicker.
PROGRESS_INTERVAL = 0.1


def main(
    prog: str,
    addresses: Sequence[Address],
    timeout: float,
    max_size: int,
    *,
    tls: bool = False,
    ca: str | None = None,
    verify: bool = True,
) -> int:
    """Fetch the poems of ``addresses`` and print them; return the exit status.

    ``prog`` starts every line on standard error; each server gets
    ``timeout`` seconds, and more than ``max_size`` bytes is no poem.  With
    ``tls``, every poem comes over TLS, the certificate checked against
    the system's CAs or those in ``ca``, unless ``verify`` is false.
    """
    context: ssl.SSLContext | None = None
    if tls:
        try:
            context = client_context(ca, verify=verify)
        except CredentialsError as exc:
            _say(f"{prog}: {exc}")
            return exits.FAILURE
    progress = Progress(sys.stderr) if _isatty(sys.stderr) else None
    try:
        return trio.run(_get, prog, addresses, timeout, max_size, context, progress)
    except BaseException as exc:
        if progress is not None:
            progress.clear()
        if _only(exc, KeyboardInterrupt):
            return exits.INTERRUPTED
        if not isinstance(exc, Exception):
            raise  # SystemExit and the like are not ours to swallow
        # A bug: say where, with the traceback, as ``serve`` does.
        _say(f"{prog}: crashed\n{''.join(traceback.format_exception(exc))}")
        return exits.CRASH


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is ``kind``, or a group of nothing else.

    trio may raise KeyboardInterrupt on its own or, through a nursery with
    strict exception groups, inside a group.
    """
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(kind)
        return matched is not None and rest is None
    return isinstance(exc, kind)


# -- fetching ----------------------------------------------------------------------


class Fetch:
    """One server's poem: :meth:`run` ends with :attr:`poem` or :attr:`error` set."""

    def __init__(self, address: Address, max_size: int, tls: ssl.SSLContext | None = None) -> None:
        self.address = address
        #: The context to fetch over TLS with, or None for plain TCP.
        self.tls = tls
        #: More than this is not a poem: a hostile or broken server would
        #: otherwise fill memory until the timeout.
        self.max_size = max_size
        #: How far the fetch got: connected yet, bytes received so far.
        self.transfer = Transfer()
        #: The whole poem, once the server has closed the connection cleanly.
        self.poem: bytes | None = None
        #: Why there is no poem: one line, without the server's name.
        self.error: str | None = None
        self.done = trio.Event()

    async def run(self, timeout: float) -> None:
        """Fetch the poem, giving up after ``timeout`` seconds."""
        try:
            poem = await fetch_within(
                self.address.host, self.address.port, self.max_size, timeout, self.transfer, self.tls
            )
        except FetchFailed as exc:
            # A reset is how a server says it gave up on the poem.
            self.error = f"{exc} (the poem is incomplete)" if exc.cut_off else str(exc)
        else:
            if len(poem) > self.max_size:
                self.error = (
                    f"too big for a poem: more than --max-poem-size "
                    f"({count(self.max_size, 'byte')}); stopped reading"
                )
            elif not poem:
                # No poetry server sends an empty poem; something is wrong
                # there (a server turning clients away, or not a poetry
                # server at all).
                self.error = "the connection was closed without a poem"
            else:
                self.poem = poem
        # Not in a ``finally``: a fetch that ends in an exception (Ctrl-C, a
        # bug) has nothing to print, and the nursery deals with it.
        self.done.set()

    @property
    def received(self) -> int:
        """Bytes received so far, for the progress line."""
        return self.transfer.received

    @property
    def connected(self) -> bool:
        return self.transfer.connected


# -- printing ----------------------------------------------------------------------


class StdoutClosed(Exception):
    """Whoever read standard output has stopped (EPIPE), as ``| head`` does."""


class Output:
    """Standard output, written from a thread, with the separator rule.

    Writing in a thread keeps the event loop, and so every other fetch and
    its timeout, running while a slow reader (a pager) holds output up.  The
    writes go straight to the descriptor: a write that Ctrl-C abandons must
    not hold the lock of ``sys.stdout``'s buffer while the interpreter
    exits.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.is_terminal = os.isatty(fd)
        #: The last poem written does not end with a newline: the next one
        #: must start with one.
        self.mid_line = False

    async def write_poem(self, poem: bytes) -> None:
        """Write ``poem``; raises StdoutClosed, or OSError if writing fails."""
        separator = b"\n" if self.mid_line else b""
        await _in_thread(self._write, separator, poem)
        self.mid_line = not poem.endswith(b"\n")

    def _write(self, *parts: bytes) -> None:
        for part in parts:
            view = memoryview(part)
            while view:
                try:
                    view = view[os.write(self.fd, view) :]
                except BrokenPipeError:
                    raise StdoutClosed from None


async def _in_thread(function: Callable[..., None], *args: bytes) -> None:
    # Ctrl-C must not wait for a reader that has stopped reading. trio 0.23
    # renamed the option, and 0.22 (Debian 12's) knows only the old name.
    options = inspect.signature(trio.to_thread.run_sync).parameters
    name = "abandon_on_cancel" if "abandon_on_cancel" in options else "cancellable"
    await trio.to_thread.run_sync(function, *args, **{name: True})


def _say(line: str) -> None:
    """Write a line (or lines) to standard error, if it is still there to write to."""
    try:
        sys.stderr.write(line if line.endswith("\n") else line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # closed, or None
        pass


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False


class Progress:
    """One line on a terminal, redrawn in place: how far each fetch has got.

    Only plain characters and carriage returns are written (a shorter line
    is padded with spaces), so it works on any terminal, even ``TERM=dumb``.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.fetches: Sequence[Fetch] = ()
        #: While set, nothing is drawn: output is being written, or standard
        #: output is this terminal and its cursor sits after a poem's last,
        #: unfinished line, which a redraw would overwrite.
        self.paused = False
        self._shown = ""

    async def run(self, fetches: Sequence[Fetch]) -> None:
        """Redraw every PROGRESS_INTERVAL seconds, until cancelled."""
        self.fetches = fetches
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            if not self.paused:
                self._draw(self._line())

    def _line(self) -> str:
        finished = sum(fetch.done.is_set() for fetch in self.fetches)
        waiting = [
            f"{fetch.address} {count(fetch.received, 'byte')}" if fetch.connected
            else f"{fetch.address} connecting"
            for fetch in self.fetches
            if not fetch.done.is_set()
        ]
        return " ".join([f"[{finished}/{len(self.fetches)} done]", ", ".join(waiting)]).rstrip()

    def _draw(self, line: str) -> None:
        # One column short of the width: a line that fills the last column
        # wraps on some terminals, and \r would then go back only one line.
        line = line[: self._columns() - 1]
        if line == self._shown:
            return
        padding = " " * (len(self._shown) - len(line))
        # Noted before writing: Ctrl-C can interrupt the write, and clear()
        # must then still know there is something to erase.
        self._shown = line
        self._write(f"\r{line}{padding}")

    def clear(self) -> None:
        """Erase the line, leaving the cursor at its start."""
        if self._shown:
            self._write("\r" + " " * len(self._shown) + "\r")
            self._shown = ""  # after: an interrupted erase is done again

    def _columns(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        return columns or 80  # a pseudo-terminal nobody sized says 0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


async def _get(
    prog: str,
    addresses: Sequence[Address],
    timeout: float,
    max_size: int,
    tls: ssl.SSLContext | None,
    progress: Progress | None,
) -> int:
    fetches = [Fetch(address, max_size, tls) for address in addresses]
    interrupted = False
    status = exits.OK
    # Ctrl-C as a signal the event loop receives, not a KeyboardInterrupt
    # raised wherever the program happens to be (it could leave a coroutine
    # half made, and Python would print a warning about it on the way out).
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:

            async def stop_on_ctrl_c() -> None:
                nonlocal interrupted
                async for _ in interrupts:
                    interrupted = True
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_ctrl_c)
            for fetch in fetches:
                nursery.start_soon(fetch.run, timeout)
            if progress is not None:
                nursery.start_soon(progress.run, fetches)
            status = await _print_in_order(prog, fetches, progress)
            nursery.cancel_scope.cancel()  # the progress line, or fetches nobody will print
    if progress is not None:
        progress.clear()
    return exits.INTERRUPTED if interrupted else status


async def _print_in_order(prog: str, fetches: Sequence[Fetch], progress: Progress | None) -> int:
    """Write each poem, or say why there is none, in the order given; the exit status."""
    output = Output(STDOUT_FILENO)
    status = exits.OK
    for fetch in fetches:  # in the order given, whichever finishes first
        await fetch.done.wait()
        if progress is not None:
            progress.paused = True
            progress.clear()
        if fetch.poem is None:
            _say(f"{prog}: {fetch.address}: {fetch.error}")
            status = exits.FAILURE
        else:
            try:
                await output.write_poem(fetch.poem)
            except StdoutClosed:
                # Nobody wants the rest; stop as quietly as `| head`
                # expects, without the other fetches.
                return exits.BROKEN_PIPE
            except OSError as exc:
                _say(f"{prog}: cannot write to standard output: {reason(exc)}")
                return exits.FAILURE
        if progress is not None:
            progress.paused = output.is_terminal and output.mid_line
    return status

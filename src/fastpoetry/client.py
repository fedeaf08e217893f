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

trio (and anything else only fetching needs) is imported inside the
functions that use it: the command line imports this module to build its
parser, and ``fastpoetry --help`` should not pay for an event loop.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TextIO

from .cli import EXIT_CRASH, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, _seconds, _size

if TYPE_CHECKING:  # fetch imports trio, which --help does without
    from .fetch import ConnectError

#: An exit status beyond cli's: a shell reports a command killed by SIGPIPE
#: as 128 plus the signal, and this says the same, without a traceback.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

#: Seconds each server gets, from the start of connecting to the end of
#: its poem, unless --timeout says otherwise.
DEFAULT_TIMEOUT = 10.0


#: Poems go straight to the descriptor (see Output), not through sys.stdout.
STDOUT_FILENO = 1

#: How often the progress line is redrawn, in seconds; also how long a
#: fetch may take before any progress is shown at all, so that poems from
#: nearby servers do not make the terminal flicker.
PROGRESS_INTERVAL = 0.1

EPILOG = """\
ADDRESS is HOST:PORT, [IPV6-ADDRESS]:PORT, or a PORT alone for this host's
loopback addresses, 127.0.0.1 and ::1. The host name localhost means the
same: both addresses are tried (the second if the first fails or is slow
to answer), and the name is never looked up.

Every server is contacted at once, and each has --timeout seconds to send
its whole poem. Poems are written to standard output exactly as received,
in the order the addresses are given, each as soon as it and every poem
before it have arrived. Between two poems a newline is added only when the
first does not end with one, so with one address the output is the poem,
byte for byte.

A server that fails (refused, not found, reset part-way, closed without a
poem, or too slow) gets one line on standard error, and none of its bytes
are written. When standard error is a terminal, it shows how many bytes
each server has sent so far.

Exit status: 0 if every poem arrived, 1 if any did not, 2 for a usage
error, 130 if interrupted, 141 if standard output was closed early (as by
'| head'), 70 if it crashed.
"""

_ADDRESS_FORMS = "HOST:PORT, [IPV6-ADDRESS]:PORT or PORT"


# -- the command line ------------------------------------------------------------


class Address(NamedTuple):
    """A server to fetch a poem from."""

    host: str
    port: int

    def __str__(self) -> str:
        from .listeners import LOOPBACK_ADDRESSES, is_localhost

        # localhost as the addresses it stands for, which are what is tried
        # (it is never looked up); the rest the way it would be typed, IPv6
        # addresses in brackets.
        if is_localhost(self.host):
            return " and ".join(str(Address(address, self.port)) for address in LOOPBACK_ADDRESSES)
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Read ``HOST:PORT``, ``[IPV6-ADDRESS]:PORT`` or ``PORT`` (on 127.0.0.1 and ::1).

    Only the form is checked; whether the host exists is found out when
    connecting, and is that server's failure, not a usage error.
    """
    import ipaddress
    if text.isascii() and text.isdigit():
        # The Twisted tutorial's client took a bare port for a local server:
        # localhost, which fetching takes for the loopback addresses.
        return Address("localhost", _port(text, text))
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise argparse.ArgumentTypeError(f"{text!r} is not {_ADDRESS_FORMS}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
        return Address(host, _port(port[1:], text))
    host, colon, port = text.rpartition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"{text!r} is not {_ADDRESS_FORMS}")
    if not host:
        raise argparse.ArgumentTypeError(f"{text!r} names no host")
    if ":" in host:
        # "::1:80" could be ::1 port 80 or ::1:80 with no port at all.
        raise argparse.ArgumentTypeError(
            f"{text!r}: write an IPv6 address in brackets, as [IPV6-ADDRESS]:PORT"
        )
    if not host.isprintable() or any(char.isspace() for char in host):
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not a host name")
    return Address(host, _port(port, text))


def _port(text: str, address: str) -> int:
    # int() alone would also take "8_0" and digits of other scripts; port 0
    # can be listened on but not connected to.
    port = int(text) if text.isascii() and text.isdigit() else 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{address!r}: {text!r} is not a port number (1 to 65535)"
        )
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``get``'s options and arguments to its parser."""
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give each server at most SECONDS to send its whole poem, "
        "from connecting to the end (default: %(default)g)",
    )
    parser.add_argument(
        "--max-poem-size",
        type=_size,
        default="16M",
        metavar="SIZE",
        help="give up on a server that sends more than SIZE bytes; K, M and G "
        "multiply by 1024 (default: %(default)s)",
    )
    parser.add_argument(
        "addresses",
        type=parse_address,
        nargs="+",
        metavar="ADDRESS",
        help="a poetry server: HOST:PORT, [IPV6-ADDRESS]:PORT, or PORT on 127.0.0.1 and ::1",
    )


def main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Fetch the poems ``args`` asks for and print them; returns the exit status."""
    prog = parser.prog
    progress = Progress(sys.stderr) if _isatty(sys.stderr) else None
    try:
        import trio

        return trio.run(_get, prog, args.addresses, args.timeout, args.max_poem_size, progress)
    except BaseException as exc:
        if progress is not None:
            progress.clear()
        if _only(exc, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        if not isinstance(exc, Exception):
            raise  # SystemExit and the like are not ours to swallow
        # A bug: say where, with the traceback, as ``serve`` does.
        import traceback

        _say(f"{prog}: crashed\n{''.join(traceback.format_exception(exc))}")
        return EXIT_CRASH


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

    def __init__(self, address: Address, max_size: int) -> None:
        import trio

        from .fetch import Transfer

        self.address = address
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
        import trio

        from .fetch import ConnectError, ReceiveError, fetch_poem

        transfer = self.transfer
        with trio.move_on_after(timeout) as deadline:
            try:
                poem = await fetch_poem(
                    self.address.host, self.address.port, self.max_size, transfer
                )
            except ConnectError as exc:
                self.error = _connect_failure(exc)
            except ReceiveError as exc:
                # A reset is how a server says it gave up on the poem.
                self.error = f"{exc.reason} after {_bytes(exc.received)} (the poem is incomplete)"
            else:
                if len(poem) > self.max_size:
                    self.error = (
                        f"too big for a poem: more than --max-poem-size "
                        f"({_bytes(self.max_size)}); stopped reading"
                    )
                elif not poem:
                    # No poetry server sends an empty poem; something is wrong
                    # there (a server turning clients away, or not a poetry
                    # server at all).
                    self.error = "the connection was closed without a poem"
                else:
                    self.poem = poem
        if deadline.cancelled_caught:
            if transfer.connected:
                self.error = f"timed out after {timeout:g} s ({_bytes(transfer.received)} received)"
            else:
                self.error = f"timed out after {timeout:g} s while connecting"
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


def _connect_failure(exc: ConnectError) -> str:
    if exc.unresolved is not None:
        return f"cannot resolve the host name ({exc.unresolved})"
    return "; ".join(exc.reasons)


def _bytes(count: int) -> str:
    return "1 byte" if count == 1 else f"{count} bytes"


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
    import inspect

    import trio

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
        import trio

        self.fetches = fetches
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            if not self.paused:
                self._draw(self._line())

    def _line(self) -> str:
        finished = sum(fetch.done.is_set() for fetch in self.fetches)
        waiting = [
            f"{fetch.address} {_bytes(fetch.received)}" if fetch.connected
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
    progress: Progress | None,
) -> int:
    import trio

    fetches = [Fetch(address, max_size) for address in addresses]
    interrupted = False
    status = EXIT_OK
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
    return EXIT_INTERRUPTED if interrupted else status


async def _print_in_order(prog: str, fetches: Sequence[Fetch], progress: Progress | None) -> int:
    """Write each poem, or say why there is none, in the order given; the exit status."""
    from .fetch import reason

    output = Output(STDOUT_FILENO)
    status = EXIT_OK
    for fetch in fetches:  # in the order given, whichever finishes first
        await fetch.done.wait()
        if progress is not None:
            progress.paused = True
            progress.clear()
        if fetch.poem is None:
            _say(f"{prog}: {fetch.address}: {fetch.error}")
            status = EXIT_FAILURE
        else:
            try:
                await output.write_poem(fetch.poem)
            except StdoutClosed:
                # Nobody wants the rest; stop as quietly as `| head`
                # expects, without the other fetches.
                return EXIT_BROKEN_PIPE
            except OSError as exc:
                _say(f"{prog}: cannot write to standard output: {reason(exc)}")
                return EXIT_FAILURE
        if progress is not None:
            progress.paused = output.is_terminal and output.mid_line
    return status

"""Fetching one poem from a poetry server: the protocol's client side.

``fastpoetry get`` and the proxy's :class:`~.proxy.ProxyService` fetch the
same way: connect (trying every address of the name, happy eyeballs), read
to a clean end of stream, which is the only end-of-poem mark the protocol
has, and take a reset as a poem cut off.  :func:`fetch_within` puts what
went wrong in the same words for both; what the bytes must be to count as
a poem is each caller's own rule.

``localhost`` is not looked up: it stands for the loopback addresses
themselves, as it does for ``--iface`` (:data:`.listeners.LOOPBACK_ADDRESSES`),
so a fetch from this host works where nothing resolves the name.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .listeners import LOOPBACK_ADDRESSES, is_localhost
from .phrases import count, reason

#: The most read from a server in one call.
RECEIVE_SIZE = 64 * 1024

#: Connecting to the loopback addresses, the next one is tried this many
#: seconds after the attempt before it began, or as soon as that attempt
#: failed: trio.open_tcp_stream's delay for the addresses of a name.
HAPPY_EYEBALLS_DELAY = 0.25


@dataclass
class Transfer:
    """How far a fetch got; the caller reads it also after cancelling the fetch."""

    connected: bool = False
    received: int = 0


class ConnectError(Exception):
    """The server could not be reached.

    ``unresolved`` is why the name did not resolve, or None; otherwise
    ``reasons`` says, once each, why connecting to its addresses failed.
    """

    def __init__(self, reasons: list[str], unresolved: str | None = None) -> None:
        super().__init__(unresolved or ", ".join(reasons))
        self.reasons = reasons
        self.unresolved = unresolved


class ReceiveError(Exception):
    """The connection broke before a clean end of stream: the poem is incomplete.

    ``reason`` says how (``connection reset``); ``received`` is how many
    bytes had come.
    """

    def __init__(self, reason: str, received: int) -> None:
        super().__init__(f"{reason} after {received} bytes")
        self.reason = reason
        self.received = received


class FetchFailed(Exception):
    """A fetch that brought no poem; the message says why in a few words, without the server's name."""

    def __init__(self, why: str, *, connected: bool, cut_off: bool = False) -> None:
        super().__init__(why)
        #: Whether the server was reached: otherwise it is unreachable.
        self.connected = connected
        #: Whether the server broke the connection part-way (a reset): the poem is incomplete.
        self.cut_off = cut_off


class HandshakeError(Exception):
    """The TLS handshake failed: the server's certificate, or the server is no TLS server."""


async def fetch_within(
    host: str, port: int, limit: int, timeout: float, transfer: Transfer, tls: ssl.SSLContext | None = None
) -> bytes:
    """:func:`fetch_poem` given ``timeout`` seconds in all, from resolving the name to the end.

    Raises :exc:`FetchFailed` for everything the server or the network
    does: a name that does not resolve, a refused connection, a failed TLS
    handshake, a reset, a timeout.  What came is returned as it is (too
    long or empty included).
    """
    with trio.move_on_after(timeout):
        try:
            return await fetch_poem(host, port, limit, transfer, tls)
        except HandshakeError as exc:
            raise FetchFailed(str(exc), connected=True) from None
        except ConnectError as exc:
            if exc.unresolved is not None:
                raise FetchFailed(f"cannot resolve the host name ({exc.unresolved})", connected=False) from None
            raise FetchFailed("; ".join(exc.reasons), connected=False) from None
        except ReceiveError as exc:
            why = f"{exc.reason} after {count(exc.received, 'byte')}"
            raise FetchFailed(why, connected=True, cut_off=True) from None
    # Only the deadline ends the block without a return or an exception.
    if transfer.connected:
        why = f"timed out after {timeout:g} s ({count(transfer.received, 'byte')} received)"
    else:
        why = f"timed out after {timeout:g} s while connecting"
    raise FetchFailed(why, connected=transfer.connected)


async def fetch_poem(
    host: str, port: int, limit: int, transfer: Transfer, tls: ssl.SSLContext | None = None
) -> bytes:
    """Connect to ``host``:``port`` and return what it sends until a clean end of stream.

    At most ``limit + 1`` bytes are read: a longer reply means the server
    sent more than ``limit``, and the caller decides what that is.  An
    empty reply is returned as it is.  ``transfer`` is kept up to date
    while the fetch runs, so that a caller that times it out can say how
    far it got.

    With ``tls``, the poem comes over TLS, checked as ``tls`` says against
    ``host`` (for ``localhost`` too, whatever loopback address answered),
    and its end must be a close_notify: an end of stream without one is
    the poem cut off.

    Raises :exc:`ConnectError`, :exc:`HandshakeError` or
    :exc:`ReceiveError`; the connection is closed whatever happens,
    cancellation included.
    """
    if is_localhost(host):
        plain = await _open_first(LOOPBACK_ADDRESSES, port)
    else:
        plain = await _open(host, port)
    transfer.connected = True
    stream: trio.abc.Stream = plain
    if tls is not None:
        stream = trio.SSLStream(plain, tls, server_hostname=host)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            raise HandshakeError(f"TLS handshake failed: {_tls_reason(exc.__cause__)}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    chunks: list[bytes] = []
    async with stream:
        while transfer.received <= limit:
            try:
                chunk = await stream.receive_some(min(RECEIVE_SIZE, limit + 1 - transfer.received))
            except trio.BrokenResourceError as exc:
                raise ReceiveError(_broken(exc), transfer.received) from None
            if not chunk:
                break
            chunks.append(chunk)
            transfer.received += len(chunk)
    return b"".join(chunks)


async def _open(host: str, port: int) -> trio.SocketStream:
    """Connect to ``host``:``port``, any of its addresses; raises :exc:`ConnectError`."""
    try:
        return await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise _connect_error(exc) from None
    except UnicodeError:  # the name cannot even be encoded for DNS (IDNA)
        raise ConnectError([], unresolved="not a valid host name") from None


async def _open_first(addresses: Sequence[str], port: int) -> trio.SocketStream:
    """Connect to whichever of the literal ``addresses`` answers first, at ``port``.

    Happy eyeballs over addresses that need no lookup, as trio does over
    those of a name: each attempt starts HAPPY_EYEBALLS_DELAY after the one
    before, or as soon as it failed, and the first connection made wins.
    Raises :exc:`ConnectError` once every attempt has failed, with each
    reason naming its address unless all failed alike.
    """
    connected: list[trio.SocketStream] = []
    failures: dict[str, ConnectError] = {}

    async def attempt(address: str, failed: trio.Event) -> None:
        try:
            stream = await _open(address, port)
        except ConnectError as exc:
            failures[address] = exc
            failed.set()
            return
        connected.append(stream)
        nursery.cancel_scope.cancel()  # the other attempts, and the wait below

    try:
        async with trio.open_nursery() as nursery:
            for address in addresses:
                failed = trio.Event()
                nursery.start_soon(attempt, address, failed)
                with trio.move_on_after(HAPPY_EYEBALLS_DELAY):
                    await failed.wait()
    except BaseException:  # cancelled from outside (a timeout): nobody gets a stream
        for stream in connected:
            stream.socket.close()
        raise
    if connected:
        # Two attempts can connect before the cancellation reaches either.
        for stream in connected[1:]:
            stream.socket.close()
        return connected[0]
    why = {address: ", ".join(failures[address].reasons) for address in addresses}
    if len(set(why.values())) == 1:
        raise ConnectError([why[addresses[0]]])
    raise ConnectError([f"{text} on {address}" for address, text in why.items()])


def _connect_error(exc: OSError) -> ConnectError:
    if isinstance(exc, socket.gaierror):
        return ConnectError([], unresolved=reason(exc))
    # open_tcp_stream tries every address of a name and, when all fail,
    # raises a plain OSError caused by a group of the attempts' errors.
    cause = exc.__cause__
    attempts = _leaves(cause) if isinstance(cause, BaseExceptionGroup) else [exc]
    return ConnectError(list(dict.fromkeys(reason(attempt) for attempt in attempts)))


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _broken(exc: trio.BrokenResourceError) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLEOFError) or getattr(cause, "reason", None) == "UNEXPECTED_EOF_WHILE_READING":
        return "closed without a TLS close_notify"
    if isinstance(cause, ssl.SSLError):
        return _tls_reason(cause)
    if isinstance(cause, OSError):
        return reason(cause)
    return str(exc).lower() or "connection broken"


def _tls_reason(cause: BaseException | None) -> str:
    """What went wrong in TLS, in a few words: OpenSSL's reason, without its source line."""
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "closed by the server"
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return cause.reason.replace("_", " ").lower()
    if isinstance(cause, OSError):
        return reason(cause)
    return "connection broken"

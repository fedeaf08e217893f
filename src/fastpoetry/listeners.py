"""Listening sockets: binding our own, adopting inherited ones, naming them, sharing them out.

The serving path takes plain listening stream sockets and never asks where
they came from; this module is where they come from.  An adopted socket is
shared with the service manager that passed it, so it is only ever closed
here, never shut down, and ``listen()`` is never called on it again (that
would override the socket unit's Backlog=).

Naming addresses includes the one name fastpoetry never looks up:
``localhost`` is the loopback addresses, here for ``--iface`` and in
:mod:`.fetch` for the servers it connects to.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Collection, Mapping, Sequence

from . import systemd
from .phrases import count, host_port, reason

log = logging.getLogger(__name__)

#: The queue of connections not yet accepted; the kernel caps it at
#: net.core.somaxconn.
BACKLOG = socket.SOMAXCONN

#: TCP_DEFER_ACCEPT, in seconds, on the sockets bound here for clients that
#: speak first (a balancer's PROXY protocol header): the kernel hands a
#: connection over once its first bytes are there, so they are read as it
#: is accepted; one that has sent nothing by then is accepted all the same.
DEFER_ACCEPT = 1

_SERVED_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)

# An address of a family the host cannot use (no IPv6, say) is skipped as
# long as another address of the same interface could be bound.
_SKIPPABLE_ERRNOS = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)

#: What the name ``localhost`` stands for, IPv4 first: the loopback
#: addresses themselves, never looked up.  An administrator who writes
#: localhost means this host's loopback, not whatever a resolver answers,
#: and there may be nothing to ask: a debootstrap minbase root has no
#: /etc/hosts, so the name resolves to nothing there.  RFC 6761 (6.3) asks
#: software to treat the name so, and systemd does (IPAddressAllow=localhost).
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")


#: accept() fails like this when the connection died while it was queued, or
#: a firewall refused it: it concerns that one connection, not the socket.
CLIENT_GONE_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.ECONNRESET,
        errno.EPROTO,
        errno.EPERM,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.ENOPROTOOPT,
        errno.EOPNOTSUPP,
    }
)


#: A listening socket and its name: FileDescriptorName=, or NAME of ``--port
#: NAME=N``; None when it has none.
NamedSocket = tuple[str | None, socket.socket]


class ListenerError(Exception):
    """A socket that cannot be listened on or served from."""


class UnservedSocket(ListenerError):
    """A socket that no poem is for: :func:`assign` found no poem of its name, and no unnamed one."""

    def __init__(self, name: str | None, where: str) -> None:
        what = f"the socket named {name!r}" if name is not None else "the socket"
        super().__init__(f"no poem for {what} ({where})")
        self.name = name
        self.where = where


def is_localhost(host: str) -> bool:
    """Whether ``host`` is the name ``localhost`` (in any case, with or without a final dot)."""
    return host.lower() in ("localhost", "localhost.")


def bind(iface: str, port: int, defer_accept: bool = False) -> list[socket.socket]:
    """Listen on every address ``iface`` stands for, at ``port``.

    ``localhost`` is 127.0.0.1 and ::1 (:data:`LOOPBACK_ADDRESSES`), with
    no name lookup; ``''`` is every address, 0.0.0.0 and ::; any other name
    is every address it resolves to.  An IPv6 socket is made IPv6-only so
    that it does not collide with the IPv4 one.  An address of a family the
    host cannot use (::1 with IPv6 disabled) is skipped with a warning, as
    long as another address could be bound.  With ``defer_accept`` the
    sockets get TCP_DEFER_ACCEPT (:data:`DEFER_ACCEPT`).  Returns the
    listening sockets, non-blocking; raises :exc:`ListenerError` when the
    name does not resolve or no address can be bound.
    """
    addresses = _addresses(iface, port)
    listeners: list[socket.socket] = []
    skipped: list[str] = []
    try:
        for family, sockaddr in addresses:
            shown = _format_address(family, sockaddr)
            try:
                sock = socket.create_server(sockaddr, family=family, backlog=BACKLOG)
            except OSError as exc:
                if exc.errno in _SKIPPABLE_ERRNOS:
                    skipped.append(f"{shown} ({reason(exc)})")
                    continue
                raise ListenerError(f"cannot listen on {shown}: {reason(exc)}") from None
            sock.setblocking(False)
            listeners.append(sock)
            if defer_accept:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    if not listeners:
        raise ListenerError(f"cannot listen on {', '.join(skipped)}")
    for address in skipped:
        log.warning("not listening on %s", address)
    return listeners


def _addresses(
    iface: str, port: int
) -> list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]]:
    """The family and socket address of each address ``iface`` stands for, once each."""
    if is_localhost(iface):
        return [
            (socket.AF_INET6 if ":" in address else socket.AF_INET, (address, port))
            for address in LOOPBACK_ADDRESSES
        ]
    try:
        infos = socket.getaddrinfo(
            iface or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenerError(f"cannot resolve {iface!r}: {reason(exc)}") from None
    return list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))


def adopt(fd: int) -> socket.socket:
    """Take over the inherited descriptor ``fd`` as a listening socket.

    It must be a listening stream socket of the IPv4, IPv6 or AF_UNIX family
    (a unit with Accept=yes or ListenDatagram= passes something else).  On
    :exc:`ListenerError` the descriptor is left open and untouched.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenerError(f"descriptor {fd} is not a socket: {reason(exc)}") from None
    try:
        if sock.family not in _SERVED_FAMILIES:
            raise ListenerError(f"descriptor {fd} is a socket of unsupported family {sock.family!r}")
        if sock.type != socket.SOCK_STREAM:
            raise ListenerError(f"descriptor {fd} is not a stream socket (ListenStream=)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenerError(f"descriptor {fd} is not listening (is Accept=yes set?)")
    except BaseException:
        sock.detach()
        raise
    sock.setblocking(False)
    return sock


def turn_away(sock: socket.socket, limit: int | None = None) -> int:
    """Accept the connections waiting on ``sock`` (``limit`` at most) and close them unserved.

    For a server that cannot start: a connection left queued on a socket
    systemd passed would make systemd start the service again at once, and
    again, until the start limit fails the socket unit too.  And for one
    that has no poem yet.  Returns how many clients were turned away; they
    see the connection closed.
    """
    turned = 0
    while limit is None or turned < limit:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return turned
        except OSError as exc:
            if exc.errno in CLIENT_GONE_ERRNOS:
                continue  # that client gave up while queued
            log.debug("stopped turning clients away on %s: %s", describe(sock), reason(exc))
            return turned
        conn.close()
        turned += 1
    return turned


def describe(sock: socket.socket) -> str:
    """The local address of a listening socket, as an administrator writes it."""
    try:
        return _format_address(sock.family, sock.getsockname())
    except OSError:
        return f"descriptor {sock.fileno()}"


def format_peer(family: int, address: object) -> str:
    """The address of a connected client, for logs.

    IPv4 clients of a dual-stack IPv6 socket (``::ffff:a.b.c.d``) are shown as
    the IPv4 address they are.
    """
    return _format_address(family, address, peer=True)


def _format_address(family: int, address: object, peer: bool = False) -> str:
    if family == socket.AF_INET:
        host, port = address  # type: ignore[misc]
        return host_port(host, port)
    if family == socket.AF_INET6:
        host, port = address[:2]  # type: ignore[index]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return host_port(host, port)
    if family == socket.AF_UNIX:
        if isinstance(address, bytes):  # abstract namespace
            address = "@" + address.lstrip(b"\0").decode("utf-8", "replace")
        if not address:
            return "unix client" if peer else "unix socket"
        return f"unix:{address}"
    return repr(address)


# -- which sockets, for which poem ---------------------------------------------


def acquire(
    iface: str,
    port: int,
    named_ports: Mapping[str, int],
    unnamed: bool,
    defer_accept: Collection[str | None] = (),
) -> list[NamedSocket]:
    """The sockets to serve on, with their names: those systemd passed, or bound here.

    Under socket activation the passed sockets are adopted (:func:`adopt`)
    and the rest of the arguments ignored: the socket unit says how they
    listen (``DeferAcceptSec=`` among the rest).  Otherwise :func:`bind`
    listens on ``iface`` at ``port`` for the unnamed poem (when ``unnamed``
    says there is one, or no port is named) and at each of ``named_ports``,
    deferring accepts on the sockets whose name is in ``defer_accept``.
    Raises :exc:`ListenerError` (or :exc:`.systemd.ActivationError`); the
    sockets taken so far are closed then.
    """
    passed = systemd.listen_sockets()
    if passed:
        return _adopt_all(passed)
    wanted: list[tuple[str | None, int]] = list(named_ports.items())
    if unnamed or not wanted:
        wanted.insert(0, (None, port))
    bound: list[NamedSocket] = []
    try:
        for name, number in wanted:
            bound.extend((name, sock) for sock in bind(iface, number, defer_accept=name in defer_accept))
    except BaseException:
        close(bound)
        raise
    return bound


def _adopt_all(passed: Mapping[int, str | None]) -> list[NamedSocket]:
    adopted: list[NamedSocket] = []
    for fd, name in passed.items():
        try:
            adopted.append((name, adopt(fd)))
        except ListenerError as exc:
            close(adopted)
            raise ListenerError(f"socket {name!r} passed by systemd: {exc}") from None
    log.info("took %s from systemd", count(len(adopted), "socket"))
    return adopted


def close(sockets: Sequence[NamedSocket]) -> None:
    """Close every socket of ``sockets`` (in this process: systemd keeps its own copy)."""
    for _, sock in sockets:
        sock.close()


def assign(names: Sequence[str | None], sockets: Sequence[NamedSocket]) -> list[list[socket.socket]]:
    """Which sockets serve which poem, for poems served on sockets named ``names``.

    A socket serves the poem of its name; any other socket the unnamed poem
    (None in ``names``), or the only poem when there is just one.  Returns
    one list of sockets per poem, in the order of ``names``; raises
    :exc:`UnservedSocket` for a socket no poem is for.
    """
    by_name = {name: index for index, name in enumerate(names) if name is not None}
    fallback: int | None = None
    if None in names:
        fallback = names.index(None)
    elif len(names) == 1:
        fallback = 0
    assigned: list[list[socket.socket]] = [[] for _ in names]
    for name, sock in sockets:
        index = by_name.get(name, fallback) if name is not None else fallback
        if index is None:
            raise UnservedSocket(name, describe(sock))
        assigned[index].append(sock)
    return assigned

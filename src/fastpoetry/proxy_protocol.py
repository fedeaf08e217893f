"""The PROXY protocol: a load balancer's header naming the client it connects for.

Behind a TCP load balancer every connection comes from the balancer, so a
server sees the balancer's address, not the client's.  HAProxy's PROXY
protocol (``proxy-protocol.txt`` in HAProxy's documentation; HAProxy's
``send-proxy`` and ``send-proxy-v2``) puts a header in front of the
client's bytes that names the client's address.  Version 1 is one line of
text, at most 107 bytes with its CRLF; version 2 is binary: a 12-byte
signature, a version and command byte, a family and transport byte, the
length of the rest, the addresses, then optional TLVs (ignored here).

:func:`parse` reads a header from the bytes received so far: it says
whether the header is whole, still incomplete, or can never become valid,
as early as the bytes allow.  It does no I/O: the accepting thread and
the event loop both read with it.

A v2 ``LOCAL`` header (a balancer's own health check) and a v1 ``UNKNOWN``
or v2 ``UNSPEC`` one name no client: the connection's own peer stands, as
the specification asks.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple

#: The longest version 1 header, CRLF included (the specification's limit).
V1_MAX_LENGTH = 107

#: The longest version 2 header taken, TLVs included.  The length field
#: would allow 65,551 bytes; a balancer's addresses and TLVs take a few
#: hundred (a UNIX address pair alone is 232), and every byte allowed is a
#: byte a stranger can make the server buffer before it knows anything.
V2_MAX_LENGTH = 2048

#: The most bytes any header takes: what to read at most before parsing.
MAX_LENGTH = max(V1_MAX_LENGTH, V2_MAX_LENGTH)

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# The fixed part of a v2 header: signature, version and command, family and
# transport, and the big-endian length of what follows.
_V2_FIXED = 16

# v2's fourteenth byte, high nibble: the address family, and how many bytes
# its source and destination addresses (and ports) take.
_V2_FAMILIES = {1: (socket.AF_INET, 12), 2: (socket.AF_INET6, 36), 3: (socket.AF_UNIX, 216)}

# v2's low nibble: UNSPEC (0) or STREAM (1); DGRAM (2) cannot describe a
# client of a stream socket.
_V2_STREAM_TRANSPORTS = (0, 1)

_V1_FAMILIES = {b"TCP4": (socket.AF_INET, ipaddress.IPv4Address), b"TCP6": (socket.AF_INET6, ipaddress.IPv6Address)}

# An AF_UNIX address in v2: a sun_path, NUL-padded to 108 bytes.
_UNIX_PATH = 108

#: What a balancer sends for nearly every client begins with these 16
#: bytes: v2, PROXY, TCP over IPv4, 12 bytes of addresses.  It is on the
#: serving path of every poem behind a balancer: a reader that only needs
#: its length can tell it by this prefix alone, and parse() looks for it
#: first.
V2_PROXY_TCP4 = V2_SIGNATURE + b"\x21\x11\x00\x0c"
#: Its length: the prefix and the addresses.
V2_PROXY_TCP4_LENGTH = len(V2_PROXY_TCP4) + 12


# Why a connection brought no valid header: the two kinds of HeaderError,
# and the two ways a header fails to arrive (the reader's to tell).
#: The header breaks the protocol's rules.
MALFORMED = "malformed"
#: The header is longer than the protocol (or, for v2, :data:`V2_MAX_LENGTH`) allows.
OVERSIZED = "oversized"
#: The client closed before its header was whole.
CUT_SHORT = "cut short"
#: The header was not whole within the deadline.
TIMED_OUT = "timed out"


class HeaderError(Exception):
    """Bytes that no more bytes can make a valid header; ``kind`` says how (MALFORMED or OVERSIZED)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind} PROXY protocol header: {detail}")
        self.kind = kind
        self.detail = detail


class Header(NamedTuple):
    """A whole PROXY protocol header."""

    #: How many bytes it took: what follows is the client's.
    length: int
    #: 1 or 2.
    version: int
    #: The client's address family, or 0 when the header names no client
    #: (v2 LOCAL, v1 UNKNOWN, v2 UNSPEC): the connection's peer stands.
    family: int
    #: The client's address as a socket of ``family`` gives it: ``(host,
    #: port)`` for IPv4 and IPv6, a path (bytes for an abstract name) for
    #: AF_UNIX; None when ``family`` is 0.
    source: object
    #: A v2 LOCAL header: the balancer speaking for itself (a health check).
    local: bool = False


def parse(data: bytes | bytearray | memoryview) -> Header | None:
    """The header at the start of ``data``; None if ``data`` is the start of one.

    Raises :exc:`HeaderError` as soon as ``data`` cannot be the start of a
    valid header: malformed, or longer than allowed.
    """
    if data[:16] == V2_PROXY_TCP4 and len(data) >= V2_PROXY_TCP4_LENGTH:
        source = socket.inet_ntop(socket.AF_INET, data[16:20]), data[24] << 8 | data[25]
        return Header(V2_PROXY_TCP4_LENGTH, 2, socket.AF_INET, source)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v2(data: bytes | bytearray | memoryview) -> Header | None:
    size = len(data)
    if size < _V2_FIXED:
        if data[:12] != V2_SIGNATURE[: min(size, 12)]:
            raise HeaderError(MALFORMED, "not a PROXY protocol signature")
        _check_v2_fields(data, size)
        return None
    if data[:12] != V2_SIGNATURE:
        raise HeaderError(MALFORMED, "not a PROXY protocol signature")
    _check_v2_fields(data, size)
    total = _V2_FIXED + (data[14] << 8 | data[15])
    if total > V2_MAX_LENGTH:
        raise HeaderError(OVERSIZED, f"{total} bytes, more than the {V2_MAX_LENGTH} taken")
    local = data[12] & 0x0F == 0
    family, needed = _V2_FAMILIES.get(data[13] >> 4, (0, 0))
    if not local and total - _V2_FIXED < needed:
        raise HeaderError(
            MALFORMED, f"{total - _V2_FIXED} bytes of addresses, {needed} needed"
        )
    if size < total:
        return None
    if local or not family:
        # The balancer itself (LOCAL), or a client it cannot name (UNSPEC):
        # whatever address block there is, the specification says to ignore it.
        return Header(total, 2, 0, None, local)
    return Header(total, 2, family, _v2_source(family, bytes(data[_V2_FIXED : _V2_FIXED + needed])))


def _check_v2_fields(data: bytes | bytearray | memoryview, size: int) -> None:
    """Check the version, command, family and transport bytes as far as they arrived."""
    if size > 12:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            raise HeaderError(MALFORMED, f"version {version}, not 2")
        if command > 1:
            raise HeaderError(MALFORMED, f"command {command}, neither LOCAL (0) nor PROXY (1)")
    if size > 13:
        family, transport = data[13] >> 4, data[13] & 0x0F
        if family > 3:
            raise HeaderError(MALFORMED, f"address family {family}, not 0 to 3")
        if data[12] & 0x0F and transport not in _V2_STREAM_TRANSPORTS:
            raise HeaderError(MALFORMED, f"transport {transport}, not a stream")


def _v2_source(family: int, addresses: bytes) -> object:
    if family == socket.AF_INET:
        return socket.inet_ntop(family, addresses[0:4]), int.from_bytes(addresses[8:10], "big")
    if family == socket.AF_INET6:
        return socket.inet_ntop(family, addresses[0:16]), int.from_bytes(addresses[32:34], "big")
    path = addresses[:_UNIX_PATH]
    if path[:1] == b"\0":  # an abstract name, as the socket module gives it
        return path.rstrip(b"\0")
    return path.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_v1(data: bytes | bytearray | memoryview) -> Header | None:
    head = bytes(data[:V1_MAX_LENGTH])
    if not head.startswith(V1_PREFIX[: len(head)]):
        raise HeaderError(MALFORMED, "neither 'PROXY ' nor the v2 signature")
    end = head.find(b"\r\n")
    if end < 0:
        if b"\n" in head or b"\r" in head[:-1]:
            raise HeaderError(MALFORMED, "a line not ended by CRLF")
        if len(head) >= V1_MAX_LENGTH:
            raise HeaderError(OVERSIZED, f"no CRLF within {V1_MAX_LENGTH} bytes")
        return None
    line = head[:end]
    fields = line.split(b" ")
    length = end + 2
    if fields[1:2] == [b"UNKNOWN"]:
        # The balancer could not tell the client's address; the rest of the
        # line is to be ignored.
        return Header(length, 1, 0, None)
    if len(fields) != 6 or fields[1] not in _V1_FAMILIES:
        raise HeaderError(
            MALFORMED, f"{_printable(line)!r} is not 'PROXY TCP4|TCP6|UNKNOWN SRC DST SPORT DPORT'"
        )
    family, kind = _V1_FAMILIES[fields[1]]
    try:
        source = kind(fields[2].decode("ascii"))
        kind(fields[3].decode("ascii"))
    except ValueError:
        raise HeaderError(MALFORMED, f"{_printable(line)!r} has an address that is not {fields[1].decode()}") from None
    ports = [_v1_port(field) for field in fields[4:6]]
    if None in ports:
        raise HeaderError(MALFORMED, f"{_printable(line)!r} has a port that is not 0 to 65535")
    return Header(length, 1, family, (str(source), ports[0]))


def _v1_port(field: bytes) -> int | None:
    # Decimal digits only, and no leading zero: one port, one spelling.
    if not (field.isdigit() and len(field) <= 5) or (field[:1] == b"0" and field != b"0"):
        return None
    number = int(field)
    return number if number <= 65535 else None


def _printable(line: bytes) -> str:
    """A header line for an error message: ASCII, control characters escaped, not too long."""
    return line[:64].decode("ascii", "backslashreplace")

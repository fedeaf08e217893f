"""What the command line can say: defaults, value parsers, and the configurations they build.

Each parser takes the text of one option and returns its value, or raises
:exc:`argparse.ArgumentTypeError` with a message that names the text and
what it should have been; argparse turns that into the one-line usage
error.  The configurations are plain frozen dataclasses: :mod:`.cli`
builds them, and the modules that run a command read them.

Nothing here imports trio: ``fastpoetry --help`` and a usage error need
no event loop.
"""

from __future__ import annotations

import argparse
import importlib.resources
import ipaddress
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from . import systemd
from .listeners import LOOPBACK_ADDRESSES, is_localhost
from .phrases import host_port

#: The port of the poem without a name, without socket activation.
DEFAULT_PORT = 10000

#: The proxy's port without socket activation: beside the server's.
DEFAULT_PROXY_PORT = 10001

#: Where to listen without socket activation: 127.0.0.1 and ::1, never
#: looked up (:func:`.listeners.bind`), so the default works also where
#: nothing resolves the name, as in a root without /etc/hosts.
DEFAULT_IFACE = "localhost"

#: The poem served when the command line names none.
DEFAULT_POEM_PATH = str(importlib.resources.files(__package__) / "default-poem.txt")

#: The largest poem read or fetched unless told otherwise: every poem is
#: held in memory whole, so a file that is not a poem (a log, a disk image)
#: must not be.
DEFAULT_MAX_POEM_SIZE = 16 * 1024 * 1024

#: As the command line writes DEFAULT_MAX_POEM_SIZE, for --help.
DEFAULT_MAX_POEM_SIZE_TEXT = "16M"

#: Seconds poems in flight may take to finish once a stop is asked for.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0

#: Seconds a client may take to receive its poem, and to close after it.
DEFAULT_SEND_TIMEOUT = 30.0

#: Seconds a client may take to send its PROXY protocol header.  A balancer
#: sends it as it connects; nginx's proxy_protocol_timeout is 30 s, but
#: every second allowed is a second a stranger holds a descriptor for.
DEFAULT_HEADER_TIMEOUT = 5.0

#: Seconds a client may take to complete its TLS handshake: a round trip
#: or two, and a slow client's key exchange.  nginx allows 60 s
#: (ssl_handshake_timeout), but as for the header, every second allowed is
#: a second a stranger holds a descriptor for.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

#: Seconds between two summaries of what was served.
DEFAULT_SUMMARY_INTERVAL = 60.0

#: Seconds a fetch from the proxy's upstream may take, and between two.
DEFAULT_UPSTREAM_TIMEOUT = 10.0
DEFAULT_REFRESH = 60.0

#: Seconds each server gets from ``fastpoetry get``, from the start of
#: connecting to the end of its poem.
DEFAULT_GET_TIMEOUT = 10.0

#: The most processes ``serve --workers`` starts: far more than the cores
#: of most machines, which is where more workers stop helping.
MAX_WORKERS = 64

#: The control socket's name in the unit's RuntimeDirectory=.
CONTROL_SOCKET_NAME = "control"

# systemd.socket(5): a FileDescriptorName= is at most 255 characters of
# ASCII, with no colon (it separates names in LISTEN_FDNAMES) and no
# control characters; systemd refuses any other name, so no socket could
# ever carry it.
_MAX_NAME_LENGTH = 255

# Binary multiples, as systemd.exec(5) reads sizes such as LimitFSIZE=.
_SIZE_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}

_ADDRESS_FORMS = "HOST:PORT, [IPV6-ADDRESS]:PORT or PORT"


# -- configurations ------------------------------------------------------------


@dataclass(frozen=True)
class PoemSpec:
    """One --poem: a file, and the socket name it is served on (if any)."""

    path: str
    name: str | None = None


@dataclass(frozen=True)
class UpstreamSpec:
    """The proxy's poem: another poetry server's, fetched and cached.

    It has no socket name: it is served on every socket, as an unnamed poem.
    """

    host: str
    port: int
    timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    refresh: float = DEFAULT_REFRESH


@dataclass(frozen=True)
class TlsPair:
    """A --tls-cert and its --tls-key: PEM files."""

    cert: str
    key: str


#: Where a served poem comes from: a file, or an upstream server.
SourceSpec = PoemSpec | UpstreamSpec


def socket_name(spec: SourceSpec) -> str | None:
    """The name of the sockets ``spec``'s poem is served on; None for every other socket."""
    return spec.name if isinstance(spec, PoemSpec) else None


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``fastpoetry serve`` or ``fastpoetry proxy`` was told on its command line."""

    poems: Sequence[SourceSpec] = field(default_factory=lambda: [PoemSpec(DEFAULT_POEM_PATH)])
    #: Where to listen without socket activation.
    iface: str = DEFAULT_IFACE
    port: int = DEFAULT_PORT
    #: Ports of named poems without socket activation: ``{NAME: port}``.
    named_ports: Mapping[str, int] = field(default_factory=dict)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    #: Keep every client until it closes (--linger always), not only those with something at stake.
    always_linger: bool = False
    max_poem_size: int = DEFAULT_MAX_POEM_SIZE
    summary_interval: float = DEFAULT_SUMMARY_INTERVAL
    #: Processes serving side by side (``serve --workers``); 1 is this one alone.
    workers: int = 1
    #: The control socket to take reload requests on (:mod:`.control`), or None.
    control: str | None = None
    #: Which sockets expect a PROXY protocol header before the poem: all of
    #: them (True), or those of the poems named here (--proxy-protocol NAME).
    proxy_protocol: bool | frozenset[str] = False
    #: Seconds a client may take to send that header.
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    #: The certificate and key of the poems served over TLS, by socket name:
    #: None's pair for every poem without a pair of its own.
    tls: Mapping[str | None, TlsPair] = field(default_factory=dict)
    #: Seconds a client may take to complete its TLS handshake.
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def tls_pair(self, spec: SourceSpec) -> TlsPair | None:
        """The certificate and key ``spec``'s poem is served with, or None for plain TCP."""
        name = socket_name(spec)
        return self.tls.get(name, self.tls.get(None))

    def expects_header(self, spec: SourceSpec) -> bool:
        """Whether the sockets serving ``spec``'s poem expect a PROXY protocol header first."""
        if isinstance(self.proxy_protocol, bool):
            return self.proxy_protocol
        return socket_name(spec) in self.proxy_protocol

    @property
    def header_socket_names(self) -> list[str | None]:
        """The names of the sockets whose clients send a PROXY protocol header first.

        None stands for the unnamed sockets: they serve the unnamed poem,
        or the only poem.
        """
        names = [socket_name(spec) for spec in self.poems if self.expects_header(spec)]
        if len(self.poems) == 1 and names:
            names.append(None)
        return names

    @property
    def socket_names(self) -> list[str | None]:
        """:func:`socket_name` of each poem, in the order of :attr:`poems`."""
        return [socket_name(spec) for spec in self.poems]


def default_control_path() -> str | None:
    """``control`` in the runtime folder systemd made for this unit, or None outside one."""
    folder = systemd.runtime_directory()
    return os.path.join(folder, CONTROL_SOCKET_NAME) if folder else None


def control_path(given: str | None) -> str | None:
    """The control socket to listen on: ``given`` (--control), else the unit's default; '' is none."""
    if given is None:
        return default_control_path()
    return given or None


class Address(NamedTuple):
    """A server to fetch a poem from."""

    host: str
    port: int

    def __str__(self) -> str:
        # localhost as the addresses it stands for, which are what is tried
        # (it is never looked up); the rest the way it would be typed.
        if is_localhost(self.host):
            return " and ".join(host_port(address, self.port) for address in LOOPBACK_ADDRESSES)
        return host_port(self.host, self.port)


# -- value parsers ---------------------------------------------------------------


def _number(text: str) -> int | None:
    # int() alone would also take "8_0", "+8" and digits of other scripts.
    return int(text) if text.isascii() and text.isdigit() else None


def port(text: str) -> int:
    """A port to listen on, 0 to 65535 (0 picks a free one)."""
    number = _number(text)
    if number is None or not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return number


def _connect_port(text: str, address: str) -> int:
    # Port 0 can be listened on but not connected to.
    number = _number(text)
    if number is None or not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{address!r}: {text!r} is not a port number (1 to 65535)")
    return number


def named_port(text: str) -> tuple[str | None, int]:
    """``[NAME=]N``: a port, for the poem named NAME if given."""
    name, sep, number = text.rpartition("=")
    if sep and not name:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty NAME before '='")
    try:
        return (name or None), port(number)
    except argparse.ArgumentTypeError as exc:
        if not name:
            raise
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def workers(text: str) -> int:
    """A number of worker processes, 1 to :data:`MAX_WORKERS`."""
    number = _number(text)
    if number is None or not 1 <= number <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers (1 to {MAX_WORKERS})")
    return number


def seconds(text: str) -> float:
    """A positive, finite number of seconds, written as a decimal number (``2``, ``0.5``, ``1e3``)."""
    try:
        # float() alone would also take "1_0", spaces around the number and
        # digits of other scripts, as int() would.
        value = float(text) if text.isascii() and text == text.strip() and "_" not in text else math.nan
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def size(text: str) -> int:
    """A positive number of bytes, optionally followed by K, M or G (binary multiples)."""
    digits, suffix = text, ""
    if text[-1:].upper() in _SIZE_SUFFIXES:
        digits, suffix = text[:-1], text[-1:].upper()
    number = _number(digits)
    if not number:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: a positive number of bytes, optionally followed by K, M or G"
        )
    return number * _SIZE_SUFFIXES[suffix]


def poem(text: str) -> PoemSpec:
    """``[NAME=]FILE``: a poem file, served on the sockets named NAME if given."""
    name, sep, path = text.partition("=")
    if not sep or "/" in name:  # a plain path, which may itself contain '='
        name, path = "", text
    elif not name:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty NAME before '='")
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r} names no FILE")
    if name and (
        len(name) > _MAX_NAME_LENGTH or ":" in name or not (name.isascii() and name.isprintable())
    ):
        raise argparse.ArgumentTypeError(
            f"{name!r} cannot be a socket name (FileDescriptorName=: "
            f"up to {_MAX_NAME_LENGTH} printable ASCII characters, no ':')"
        )
    return PoemSpec(path=path, name=name or None)


def named_file(text: str) -> tuple[str | None, str]:
    """``[NAME=]FILE``, as for :func:`poem`: (NAME or None, FILE)."""
    spec = poem(text)
    return spec.name, spec.path


def address(text: str) -> Address:
    """``HOST:PORT``, ``[IPV6-ADDRESS]:PORT`` or ``PORT`` (on 127.0.0.1 and ::1).

    Only the form is checked; whether the host exists is found out when
    connecting, and is that server's failure, not a usage error.
    """
    if _number(text) is not None:
        # The Twisted tutorial's client took a bare port for a local server:
        # localhost, which fetching takes for the loopback addresses.
        return Address("localhost", _connect_port(text, text))
    if text.startswith("["):
        host, bracket, number = text[1:].partition("]")
        if not bracket or not number.startswith(":"):
            raise argparse.ArgumentTypeError(f"{text!r} is not {_ADDRESS_FORMS}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
        return Address(host, _connect_port(number[1:], text))
    host, colon, number = text.rpartition(":")
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
    return Address(host, _connect_port(number, text))

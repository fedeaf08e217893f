"""Poems over TLS: the server's certificate and key, and one client's connection.

A TLS socket serves the same protocol as a plain one, inside TLS: the
poem, then the end of the stream.  The end is a TLS close_notify, which a
client can tell from a connection cut off (a truncation attack looks like
a plain close); the TCP end of stream follows it.

:class:`Credentials` keeps the SSL context made from a certificate and a
key file, and makes a new one on reload, as :class:`~.poetry.PoetryService`
keeps a poem.  The files may be systemd credentials (``LoadCredential=``,
systemd.exec(5)), which the service reads in ``$CREDENTIALS_DIRECTORY``
while the key on disk stays readable by root alone.

:class:`Handshake` is the serving path's side of one client's TLS, on
memory BIOs (``SSLContext.wrap_bio``): OpenSSL reads and writes buffers,
and the server moves the bytes on the socket itself, as it does a plain
poem's.  So the bytes on the wire are the server's to count, and the
lingering close asks the kernel about a TLS client as it asks about a
plain one (:func:`~.linger.nothing_at_stake`); the poem's last record and
the close_notify leave in one ``send()``; and none of the ssl module's
socket calls (a timeout reset in every ``do_handshake()``, a
``getpeername()``) are made.  A poem is encrypted a chunk at a time, so a
big one is not held encrypted whole for every client.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import socket
import ssl
import stat
from dataclasses import dataclass

import trio

from .phrases import reason
from .service import Service

log = logging.getLogger(__name__)

#: The oldest protocol offered.  TLS 1.0 and 1.1 are deprecated (RFC 8996).
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

#: The largest certificate or key file read: a chain is a few kilobytes,
#: and this is not a file to hold whole in memory if it is something else.
MAX_FILE_SIZE = 1024 * 1024

#: What the kinds of failed handshakes are called in the warning that counts
#: them (one too slow is proxy_protocol.TIMED_OUT, as a late header is).
FAILED, CLOSED = "failed", "closed"

_CERTIFICATE_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"
_ENCRYPTED_KEY_MARKS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


class CredentialsError(Exception):
    """A certificate or key that cannot be served; the message names the file and the reason.

    It never quotes the files: a key must not end up in a log.
    """


class HandshakeFailed(Exception):
    """A client's TLS handshake did not succeed; ``kind`` is FAILED or CLOSED."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class Loaded:
    """A certificate and key loaded into a context, and how to tell the certificate."""

    context: ssl.SSLContext
    #: The SHA-256 of the certificate served (the first of the file), as
    #: ``openssl x509 -fingerprint -sha256`` prints it.
    fingerprint: str


def load(cert: str, key: str) -> Loaded:
    """A server context for the PEM certificate (chain) in ``cert`` and the key in ``key``.

    TLS 1.2 and 1.3 only, otherwise the ssl module's defaults.  No session
    tickets: a poetry client fetches once, and a ticket would cost every
    connection an encryption for a resumption that never comes.  Raises
    :exc:`CredentialsError` for a file that cannot be read, has no
    certificate or no key, an encrypted key, or a key that does not match
    the certificate.
    """
    certificate = _read(cert, "certificate")
    if _CERTIFICATE_MARK not in certificate:
        raise CredentialsError(f"no PEM certificate in {cert}")
    secret = _read(key, "key")
    if _KEY_MARK not in secret:
        raise CredentialsError(f"no PEM private key in {key}")
    if any(mark in secret for mark in _ENCRYPTED_KEY_MARKS):
        # The ssl module would ask for a passphrase on the terminal.
        raise CredentialsError(f"the private key in {key} is encrypted; give it unencrypted, root-only")
    del secret
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CredentialsError(f"the private key in {key} does not match the certificate in {cert}") from None
        raise CredentialsError(f"cannot load the certificate in {cert} with the key in {key}: {_ssl_reason(exc)}") from None
    except OSError as exc:  # a file replaced meanwhile
        raise CredentialsError(f"cannot load the certificate in {cert} with the key in {key}: {reason(exc)}") from None
    return Loaded(context, fingerprint(certificate))


def fingerprint(pem: bytes) -> str:
    """The SHA-256 fingerprint of the first certificate in ``pem``, as AB:CD:..."""
    start = pem.index(_CERTIFICATE_MARK)
    end = pem.index(b"-----END CERTIFICATE-----", start) + len(b"-----END CERTIFICATE-----")
    der = ssl.PEM_cert_to_DER_cert(pem[start:end].decode("ascii", "replace"))
    return hashlib.sha256(der).digest().hex(":").upper()


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CredentialsError(f"cannot load the TLS {what} from {path}: not a regular file")
            if info.st_size > MAX_FILE_SIZE:
                raise CredentialsError(f"cannot load the TLS {what} from {path}: bigger than {MAX_FILE_SIZE} bytes")
            return file.read(MAX_FILE_SIZE)
    except OSError as exc:
        raise CredentialsError(f"cannot load the TLS {what} from {path}: {reason(exc)}") from None


def _no_password() -> bytes:
    raise CredentialsError("an encrypted private key")


def _ssl_reason(exc: ssl.SSLError) -> str:
    # OpenSSL's reason code, in words; never the data it was reading.
    return (exc.reason or exc.strerror or "not a valid PEM file").replace("_", " ").lower()


class Credentials(Service):
    """Keeps the SSL context of a certificate and key file pair, and loads it again on demand.

    As a :class:`~.poetry.PoetryService` keeps its poem: a handshake that
    took :attr:`context` before a reload finishes with the old pair, one
    that starts after it gets the new one.
    """

    def __init__(self, cert: str, key: str, *, first: Loaded | None = None) -> None:
        """``first``, if given, is what the first :meth:`read` returns (a worker's, from its main process)."""
        super().__init__("tls")
        self.cert = cert
        self.key = key
        self._loaded: Loaded | None = None
        self._first = first

    @property
    def context(self) -> ssl.SSLContext:
        """The context new connections are served with."""
        assert self._loaded is not None, "not started"
        return self._loaded.context

    async def start(self, nursery: trio.Nursery) -> None:
        """Load the pair; :exc:`CredentialsError` leaves the service stopped."""
        self.use(await self.read())
        await super().start(nursery)

    async def read(self) -> Loaded:
        """Load the files again without serving them yet (see :meth:`use`)."""
        if self._first is not None:
            loaded, self._first = self._first, None
            return loaded
        return await trio.to_thread.run_sync(load, self.cert, self.key)

    def use(self, loaded: Loaded) -> None:
        """Serve new connections with ``loaded`` from now on."""
        self._loaded = loaded
        log.info(
            "loaded the TLS certificate from %s (SHA-256 %s) and its key from %s",
            self.cert,
            loaded.fingerprint,
            self.key,
            extra={"TLS_CERT": self.cert, "TLS_FINGERPRINT": loaded.fingerprint},
        )


def client_context(ca: str | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """The context ``fastpoetry get --tls`` fetches with: the ssl module's defaults, TLS 1.2 and 1.3.

    It checks the server's certificate against the system's CAs, or those
    in the PEM file ``ca``, and the host name; ``verify=False`` checks
    nothing (``--insecure``).  Raises :exc:`CredentialsError` naming ``ca``
    if it cannot be loaded.
    """
    context = ssl.create_default_context()
    context.minimum_version = MINIMUM_VERSION
    # Python sets this with OpenSSL 3: an end of stream without a
    # close_notify would then read as a clean end, and a poem cut off as whole.
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if ca is not None:
        # Looked at first, as the server's pair is: a FIFO would hang
        # OpenSSL, and a huge file is refused.  OpenSSL then reads it again
        # by name, for its own clearer reasons (cadata= has none for an
        # empty or corrupt file); once a run, so the second read is kept.
        _read(ca, "CA certificates")
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise CredentialsError(f"cannot load the TLS CA certificates from {ca}: {_ssl_reason(exc)}") from None
        except OSError as exc:
            raise CredentialsError(f"cannot load the TLS CA certificates from {ca}: {reason(exc)}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# -- one client of the server ------------------------------------------------------

#: How much the client may send in one read during the handshake: its
#: first flight is a few hundred bytes, a certificate chain a few kilobytes.
READ_SIZE = 16 * 1024

#: How much of a poem is encrypted at a time: the whole of a common poem,
#: and a bounded piece of a big one.
CHUNK = 64 * 1024


class Handshake:
    """The server's side of one client's TLS, on memory BIOs, its bytes moved and counted here.

    :meth:`step` takes the handshake as far as the bytes that arrived
    allow; then :meth:`seal` encrypts the poem, a chunk at a time, and
    :meth:`close_notify` ends it.  ``sent`` and ``received`` count every
    byte that went either way on the socket, the handshake's included.
    """

    __slots__ = ("_tls", "_incoming", "_outgoing", "pending", "sent", "received")

    def __init__(self, context: ssl.SSLContext, received: int = 0) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        #: What the server has to send and the socket has not taken yet.
        self.pending = b""
        self.sent = 0
        #: ``received``: bytes the client sent before its handshake (a PROXY protocol header).
        self.received = received

    def step(self, conn: socket.socket) -> int:
        """Read what arrived, answer it; 0 once the handshake is done, else what to wait for.

        What to wait for is ``select.EPOLLIN``, or ``select.EPOLLOUT`` while
        the socket has not taken the server's answer.  Once done, what the
        server still has to send goes out with the poem (:meth:`seal`).
        Raises :exc:`HandshakeFailed` if the client closed, the connection
        failed, or the handshake failed (after a try at sending OpenSSL's
        alert, which says why); the caller closes the connection.
        """
        if self.pending:  # the server's flight, before the handshake is done
            return select.EPOLLIN if self._flush(conn) else select.EPOLLOUT
        try:
            data = conn.recv(READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return select.EPOLLIN
        except OSError as exc:
            raise HandshakeFailed(CLOSED, f"TLS handshake failed: {reason(exc)}") from None
        if not data:
            raise HandshakeFailed(CLOSED, "closed during the TLS handshake")
        self.received += len(data)
        self._incoming.write(data)
        done = False
        try:
            self._tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            self.pending = self._outgoing.read()
            try:
                self._flush(conn)
            except HandshakeFailed:
                pass
            raise HandshakeFailed(FAILED, f"TLS handshake failed: {_ssl_reason(exc)}") from None
        self.pending = self._outgoing.read()
        if done:
            return 0
        return select.EPOLLIN if self._flush(conn) else select.EPOLLOUT

    def _flush(self, conn: socket.socket) -> bool:
        """Send what is pending, as far as the socket takes it; True once it is all sent."""
        try:
            sent = conn.send(self.pending, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise HandshakeFailed(CLOSED, f"TLS handshake failed: {reason(exc)}") from None
        self.sent += sent
        self.pending = self.pending[sent:]
        return not self.pending

    def seal(self, piece: bytes | memoryview) -> bytes:
        """``piece`` of the poem as records to send, after what was pending (the handshake's end).

        An ssl.SSLError if the client's TLS went wrong meanwhile.
        """
        self._tls.write(piece)
        data, self.pending = self.pending + self._outgoing.read(), b""
        return data

    def close_notify(self) -> bytes:
        """The close_notify that ends the poem, to send; the client's is not waited for.

        An ssl.SSLError if the client's TLS went wrong meanwhile.
        """
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # ours is written; the client's is on its way, or not
        data, self.pending = self.pending + self._outgoing.read(), b""
        return data

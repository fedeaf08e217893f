"""nginx as a fast poetry server: a configuration whose stream server returns the poem.

The stream module's ``return`` directive sends a string to every client
and closes the connection, which is the whole fast poetry protocol, in C.

Two things about nginx's configuration language decide how the poem is
written into it:

* Inside a double-quoted string ``\\`` and ``"`` are escaped with a
  backslash, but there is no escape for ``$``: it always starts a
  variable.  A literal ``$`` comes from a variable whose value is ``$``,
  set by a ``geo`` block (geo values are plain strings, never
  interpolated), and is written as ``${fp_dollar}``.
* One token may be at most a few KiB (the parser's buffer is 4096 bytes),
  so a longer poem is split into chunks, each the value of a ``set``
  variable, and ``return`` concatenates them: ``return "$p0$p1...";``.
  A poem short enough for one token goes straight into ``return``, as an
  nginx administrator would write it, and nginx sends it without copying.

Over TLS (``tls``: a certificate and its key) the same server listens with
``ssl``: TLS 1.2 and 1.3, a full handshake for every connection.  No
session is kept (``ssl_session_cache off``), no TLS 1.2 ticket is issued
(``ssl_session_tickets off``), and no TLS 1.3 ticket either: nginx 1.22
still sends two after every handshake with both of those off, tickets no
client could use since no cache holds their sessions, so ``NumTickets 0``
is passed to OpenSSL (``ssl_conf_command``), as fastpoetry sets
``num_tickets = 0``.  nginx ends the poem with a close_notify.
"""

from __future__ import annotations

from pathlib import Path

#: The module Debian's libnginx-mod-stream installs.
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

#: Largest escaped chunk in one token; well below the parser's 4096 bytes.
MAX_TOKEN = 3072

#: Raw bytes escaped at a time: even if all were ``$`` (12 bytes escaped)
#: the slice still fits in one token.
_SLICE = MAX_TOKEN // len(b"${fp_dollar}")

_DOLLAR = b"${fp_dollar}"


def escape(raw: bytes) -> bytes:
    """``raw`` as the inside of a double-quoted nginx string."""
    if b"\0" in raw:
        raise ValueError("nginx cannot hold a NUL byte in its configuration")
    return raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"$", _DOLLAR)


def chunks(poem: bytes) -> list[bytes]:
    """The poem, escaped, in pieces that each fit in one token."""
    pieces: list[bytes] = []
    current = b""
    for start in range(0, len(poem), _SLICE):
        escaped = escape(poem[start : start + _SLICE])
        if len(current) + len(escaped) > MAX_TOKEN:
            pieces.append(current)
            current = b""
        current += escaped
    if current:
        pieces.append(current)
    return pieces


def render(poem: bytes, port: int, run_dir: Path, *, backlog: int, tls: tuple[Path, Path] | None = None) -> bytes:
    """A complete nginx.conf: one worker, in the foreground, serving ``poem`` on 127.0.0.1:``port``.

    ``tls``: the certificate and key files; the server then speaks TLS.
    """
    pieces = chunks(poem)
    if len(pieces) == 1 and _DOLLAR not in pieces[0]:
        body = b'        return "' + pieces[0] + b'";\n'
    else:
        sets = b"".join(b"        set $p%d \"%s\";\n" % (i, piece) for i, piece in enumerate(pieces))
        names = b"".join(b"$p%d" % i for i in range(len(pieces)))
        body = sets + b'        return "' + names + b'";\n'
    dollar = b'    geo $fp_dollar { default "$"; }\n' if _DOLLAR in b"".join(pieces) else b""
    head = f"""\
# Written by the fastpoetry benchmark for one run; see bench/nginx_conf.py.
load_module {STREAM_MODULE};
worker_processes 1;
daemon off;
master_process on;
pid {run_dir / "nginx.pid"};
error_log {run_dir / "nginx-error.log"};
events {{
    worker_connections 8192;
}}
stream {{
"""
    server = f"""\
    server {{
        listen 127.0.0.1:{port}{" ssl" if tls else ""} backlog={backlog};
"""
    if tls:
        cert, key = tls
        server += f"""\
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        ssl_conf_command NumTickets 0;
"""
    return head.encode() + dollar + server.encode() + body + b"    }\n}\n"

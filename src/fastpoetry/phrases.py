"""How fastpoetry words things in its logs and messages.

Small pure functions that several modules need, so that a count, an error
or an address reads the same wherever it appears.  Nothing here imports
anything slow: the command line uses it before any event loop exists.
"""

from __future__ import annotations

import errno
import os
import socket


def count(number: int, noun: str, plural: str | None = None) -> str:
    """``1 poem``, ``2 poems``; ``plural`` for a noun that does not just take an s."""
    if number == 1:
        return f"{number} {noun}"
    return f"{number} {plural or noun + 's'}"


def reason(exc: BaseException) -> str:
    """Why a call failed, in lower case and without the address it was about.

    ``os.strerror`` of the errno rather than ``exc.strerror``: a socket
    call's own text may repeat the address (``create_server()`` appends
    it), and every caller names the address itself.  A resolver error
    (gaierror) carries its own text, as does an exception without errno.
    """
    if isinstance(exc, socket.gaierror):
        return (exc.strerror or str(exc)).lower()
    number = getattr(exc, "errno", None)
    if number == errno.ECONNRESET:
        return "connection reset"  # not "by peer": who else
    if number:
        return os.strerror(number).lower()
    return str(exc).lower()


def host_port(host: str, port: int) -> str:
    """``127.0.0.1:10000``, ``[::1]:10000``: an address as an administrator types it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

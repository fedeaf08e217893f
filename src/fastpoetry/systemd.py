"""Everything fastpoetry says to or takes from systemd, in one place.

Socket activation, service notification, the watchdog and the journal all
go through systemd-python; nothing else in the package imports it.  Outside
systemd every function here is harmless: no sockets are passed, notifications
go nowhere, and the journal is not used.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import systemd.daemon
import systemd.journal

from .phrases import reason

log = logging.getLogger(__name__)

_IDENTIFIER = "fastpoetry"

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# One warning is enough when NOTIFY_SOCKET points nowhere: the service
# would otherwise repeat it at every status update.
_notify_failed = False

# sd_notify(3) opens a socket for every message. When clients hold every
# descriptor the process may have, WATCHDOG=1 could not be sent and systemd
# would kill a server that is only busy; this descriptor is kept in reserve
# and given up for the moment a message needs it.
_reserve: int | None = None
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})


class ActivationError(Exception):
    """The LISTEN_* variables are set for this process but cannot be used."""


def listen_sockets() -> dict[int, str]:
    """Take the sockets systemd passed to this process, as ``{fd: name}``.

    Implements sd_listen_fds_with_names(3): the names come from the socket
    units' FileDescriptorName= (or systemd-socket-activate's --fdname).  The
    LISTEN_* variables are removed so no child inherits them, and the
    descriptors are marked close-on-exec.  Without LISTEN_FDS, or with a
    LISTEN_PID that is not this process, the result is empty.

    Raises :exc:`ActivationError` when the variables are meant for this
    process but are not valid.
    """
    seen = {name: os.environ.get(name) for name in _LISTEN_VARIABLES}
    try:
        return systemd.daemon.listen_fds_with_names(unset_environment=True)
    except (OSError, ValueError) as exc:
        shown = " ".join(f"{key}={value!r}" for key, value in seen.items() if value is not None)
        raise ActivationError(f"cannot use the sockets passed by systemd ({shown}): {exc}") from None
    finally:
        # libsystemd unsets them in the C environment only; os.environ is
        # Python's own copy, and the one subprocesses inherit.
        for name in _LISTEN_VARIABLES:
            os.environ.pop(name, None)


def watchdog_interval() -> float | None:
    """How often to send ``WATCHDOG=1``, in seconds, or None when not asked to.

    Implements sd_watchdog_enabled(3): systemd sets WATCHDOG_USEC to the
    unit's WatchdogSec=, and WATCHDOG_PID to the process it watches.  We ping
    at half the timeout, as the man page recommends.
    """
    pid = os.environ.get("WATCHDOG_PID")
    usec = os.environ.get("WATCHDOG_USEC")
    if usec is None:
        return None
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        microseconds = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    if microseconds <= 0:
        return None
    return microseconds / 2_000_000


def runtime_directory() -> str | None:
    """The folder systemd made for this unit under /run, or None outside one.

    systemd.exec(5): RuntimeDirectory= makes it, owned by the unit's user,
    and sets RUNTIME_DIRECTORY to its path, for ExecStart= and ExecReload=
    alike (several paths, colon-separated, when the unit names several: the
    first is taken).
    """
    first = os.environ.get("RUNTIME_DIRECTORY", "").split(":", 1)[0]
    return first or None


def notify_ready(status: str) -> None:
    """Tell systemd start-up or a reload is complete (sd_notify(3) READY=1)."""
    _notify(f"READY=1\nSTATUS={status}")


def notify_reloading() -> None:
    """Tell systemd a reload has begun (sd_notify(3) RELOADING=1).

    MONOTONIC_USEC lets systemd 253 and later match the reload to the
    request; older versions ignore it.
    """
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    _notify(f"RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=Reloading poems")


def notify_stopping(status: str) -> None:
    """Tell systemd shutdown has begun (sd_notify(3) STOPPING=1)."""
    _notify(f"STOPPING=1\nSTATUS={status}")


def notify_status(status: str) -> None:
    """Set the line ``systemctl status`` shows (sd_notify(3) STATUS=)."""
    _notify(f"STATUS={status}")


def notify_watchdog() -> None:
    """Tell the watchdog the event loop is alive (sd_notify(3) WATCHDOG=1)."""
    _notify("WATCHDOG=1")


def _notify(message: str) -> None:
    global _notify_failed
    try:
        _notify_with_reserve(message)
    except OSError as exc:
        if not _notify_failed:
            _notify_failed = True
            log.warning(
                "cannot notify systemd at NOTIFY_SOCKET=%s: %s",
                os.environ.get("NOTIFY_SOCKET"),
                reason(exc),
            )


def _notify_with_reserve(message: str) -> None:
    global _reserve
    if "NOTIFY_SOCKET" not in os.environ:
        return
    if _reserve is None:
        _reserve = _open_reserve()
    try:
        systemd.daemon.notify(message)
    except OSError as exc:
        if exc.errno not in _OUT_OF_DESCRIPTORS or _reserve is None:
            raise
        os.close(_reserve)
        _reserve = None
        try:
            systemd.daemon.notify(message)
        finally:
            _reserve = _open_reserve()


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # out of descriptors already: try again next time


def stderr_is_journal() -> bool:
    """Whether standard error is a stream to the journal.

    systemd.exec(5): JOURNAL_STREAM holds the device and inode of the stream
    systemd connected; it is inherited, so it only counts if standard error
    is still that very stream.
    """
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(2)
    except OSError:
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def journal_handler() -> logging.Handler:
    """A logging handler that writes to the journal with structured fields.

    Fields a log call passes as ``extra={"POEM": ...}`` become journal fields
    (see systemd.journal-fields(7)); levels become syslog priorities.
    """
    return systemd.journal.JournalHandler(SYSLOG_IDENTIFIER=_IDENTIFIER)

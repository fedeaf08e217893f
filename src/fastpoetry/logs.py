"""Where log messages go: the journal under systemd, standard error otherwise."""

from __future__ import annotations

import logging
import sys

from . import systemd

#: Choices of --log-target.
TARGETS = ("auto", "journal", "stderr")

#: Choices of --log-level.
LEVELS = ("debug", "info", "warning", "error")

_STDERR_FORMAT = "%(asctime)s fastpoetry[%(process)d] %(levelname)s: %(message)s"


def setup(level: str = "info", target: str = "auto") -> None:
    """Send the package's log records to the journal or to standard error.

    With ``auto`` the journal is used when standard error is already a
    stream to it (the service runs under systemd), so messages keep their
    priority and structured fields (POEM, PEER, BYTES...).
    """
    use_journal = target == "journal" or (target == "auto" and systemd.stderr_is_journal())
    handler: logging.Handler
    if use_journal:
        handler = systemd.journal_handler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_STDERR_FORMAT))
    logger = logging.getLogger(__package__)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False

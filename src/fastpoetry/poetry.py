"""Poems: reading them from files, and the service that keeps one.

:class:`PoetryService` knows a poem file and the poem it last read from it;
it knows nothing about sockets.  Whatever serves the poem (the stream server
here, a datagram or proxy front end tomorrow) asks it for :attr:`poem`.
"""

from __future__ import annotations

import logging
import os
import stat

import trio

from .options import DEFAULT_MAX_POEM_SIZE, DEFAULT_POEM_PATH
from .phrases import reason
from .service import Service

__all__ = ["DEFAULT_MAX_POEM_SIZE", "DEFAULT_POEM_PATH", "PoemError", "PoetryService", "check_poem", "read_poem"]

log = logging.getLogger(__name__)

# Opening a FIFO for reading would wait for a writer; O_NONBLOCK makes the
# open return at once so that the type check below can refuse it.
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class PoemError(Exception):
    """A poem file that cannot be served; the message names file and reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot load a poem from {path}: {reason}")
        self.path = path
        self.reason = reason


def read_poem(path: str, max_size: int = DEFAULT_MAX_POEM_SIZE) -> bytes:
    """Read and check the poem in ``path``, returning its exact bytes.

    A poem must be a regular file (or a link to one), readable, not empty,
    at most ``max_size`` bytes, and UTF-8 text.  Anything else raises
    :exc:`PoemError`; nothing larger than ``max_size`` is ever read into
    memory, even from a file that grows while it is read.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise PoemError(path, reason(exc)) from None
    try:
        # Check the type before open(): it refuses a directory on its own,
        # with an error of its own and without closing the descriptor.
        info = os.fstat(fd)
        kind = stat.S_IFMT(info.st_mode)
        if kind != stat.S_IFREG:
            raise PoemError(path, f"not a regular file ({_FILE_KINDS.get(kind, 'special')})")
        if info.st_size > max_size:
            raise PoemError(path, _too_big(info.st_size, max_size))
        file = open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    with file:
        try:
            # One byte more than allowed tells a file that grew since fstat().
            poem = file.read(max_size + 1)
        except OSError as exc:
            raise PoemError(path, reason(exc)) from None
    return check_poem(poem, path, max_size)


def check_poem(
    poem: bytes, origin: str, max_size: int = DEFAULT_MAX_POEM_SIZE, *, what: str = "the file"
) -> bytes:
    """Check that ``poem`` may be served, and return it unchanged.

    The rules every source of poems applies (a file, an upstream server): a
    poem is not empty, at most ``max_size`` bytes, and UTF-8 text.  A reader
    stops at ``max_size + 1`` bytes, so a poem over the limit is refused
    without its full size.  Anything else raises :exc:`PoemError` for
    ``origin``; ``what`` names what held the poem when it is empty ("the
    file is empty").  Decoding is linear in the size: call it off the event
    loop for a large poem.
    """
    if len(poem) > max_size:
        raise PoemError(origin, _too_big(None, max_size))
    if not poem:
        raise PoemError(origin, f"{what} is empty")
    try:
        poem.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoemError(
            origin, f"not UTF-8 text (byte 0x{poem[exc.start]:02x} at offset {exc.start})"
        ) from None
    return poem


def _too_big(size: int | None, max_size: int) -> str:
    limit = f"more than the largest poem allowed ({max_size} bytes)"
    return f"too big for a poem: {size} bytes, {limit}" if size is not None else f"too big for a poem: {limit}"


class PoetryService(Service):
    """Keeps the poem read from one file and re-reads it on demand.

    The poem is replaced as a whole: a reader that took :attr:`poem` before a
    reload keeps the old bytes, one that takes it after gets the new ones.
    """

    def __init__(
        self,
        path: str,
        poem_name: str | None = None,
        *,
        max_size: int = DEFAULT_MAX_POEM_SIZE,
        first: bytes | None = None,
    ) -> None:
        """``first``, if given, is what the first :meth:`read` returns instead of reading.

        A worker of ``serve --workers`` starts with the very bytes its main
        process read and checked before it forked, so that every worker
        starts with the same poem; reloads read the file.
        """
        super().__init__("poetry")
        self.path = path
        self.poem_name = poem_name
        self.max_size = max_size
        self._poem = b""
        self._first = first

    @property
    def label(self) -> str:
        """How people are told which poem this is: its name, or its file."""
        return self.poem_name or os.path.basename(self.path)

    @property
    def poem(self) -> bytes:
        """The poem being served."""
        return self._poem

    def status(self, sockets: str, served: str) -> str:
        """The status line when this is the only poem: ``Serving lantern.txt (812 bytes) on 1 socket; ...``."""
        return f"Serving {self.label} ({len(self._poem)} bytes) on {sockets}; {served}"

    async def start(self, nursery: trio.Nursery) -> None:
        """Read the poem; :exc:`PoemError` leaves the service stopped."""
        self.use(await self.read())
        await super().start(nursery)

    async def read(self) -> bytes:
        """Read the file again without serving it yet (see :meth:`use`)."""
        if self._first is not None:
            poem, self._first = self._first, None
            return poem
        return await trio.to_thread.run_sync(read_poem, self.path, self.max_size)

    def use(self, poem: bytes) -> None:
        """Serve ``poem`` from now on."""
        self._poem = poem
        log.info(
            "loaded a poem from: %s (%d bytes)",
            self.path,
            len(poem),
            extra={"POEM": self.label, "POEM_FILE": self.path, "BYTES": len(poem)},
        )

    async def reload(self) -> None:
        """Re-read the file; on :exc:`PoemError` the old poem stays."""
        self.use(await self.read())

"""The naive trio peer: a fast poetry server written the idiomatic trio way.

``trio.serve_tcp`` gives every client a task and a SocketStream; the
handler sends the poem and closes the stream.  This is the design
fastpoetry's serving path was built to beat, measured on the same
interpreter and trio:

    python3 trio_poetry.py POEM PORT [HOST]
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

#: As the other servers in the benchmark: the kernel's largest by default.
BACKLOG = 4096


async def serve(poem: bytes, port: int, host: str) -> None:
    async def send_poem(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await stream.send_all(poem)
        except trio.BrokenResourceError:
            pass  # the client went away first; serve_tcp would crash on it

    await trio.serve_tcp(send_poem, port, host=host, backlog=BACKLOG)


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: trio_poetry.py POEM PORT [HOST]")
    poem = Path(sys.argv[1]).read_bytes()
    host = sys.argv[3] if len(sys.argv) == 4 else "127.0.0.1"
    try:
        trio.run(serve, poem, int(sys.argv[2]), host)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

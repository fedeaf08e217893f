"""The poems the benchmark serves: the 3 KB poem of the targets, and a generated 1 MiB one."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: The 3 KB poem of the issue's targets.
SMALL_POEM = REPO / "poems" / "harbour-ledger.txt"

BIG_POEM_SIZE = 1024 * 1024


def write_big_poem(path: Path, size: int = BIG_POEM_SIZE) -> None:
    """A UTF-8 poem of exactly ``size`` bytes in numbered lines, with ``"`` and ``\\`` in them.

    No ``$``: nginx would have to interpolate a variable for each one on
    every connection (see nginx_conf.py), which would measure the escaping
    rather than the serving.  tests/test_bench.py checks ``$`` separately.
    """
    lines, total, number = [], 0, 0
    while total < size:
        line = f'{number:07d} the harbour\'s "ledger" owes 3.50 \\ a lantern — counted twice\n'
        lines.append(line)
        total += len(line.encode())
        number += 1
    text = "".join(lines).encode()[: size - 1]
    text = text.decode(errors="ignore").encode()  # without a character the cut split
    path.write_bytes(text + b" " * (size - 1 - len(text)) + b"\n")

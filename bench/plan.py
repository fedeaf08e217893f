"""What a run measures, and how much: the full run and the smoke run.

Each load is what one server gets at one concurrency in all, over its
rounds: the servers of a section take turns, and a server's total is cut
into one slice per round (see sections.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from measure import Load


@dataclass(frozen=True)
class Plan:
    """The concurrencies, the load of each kind of cell, and how many rounds."""

    concurrencies: tuple[int, ...]
    target: Load  # the cell at report.TARGET_CONCURRENCY
    other: Load  # every other concurrency
    big_concurrency: int
    big: Load
    cold_repeats: int
    logging: Load  # each log level
    workers: Load
    #: System calls are counted in a slice of their own after each measured
    #: slice (perf's counting slows the calls it counts): this much load.
    count: Load
    #: The calls of each server one by one, once, after the rounds at
    #: report.TARGET_CONCURRENCY.
    breakdown: Load
    #: Over TLS, a full handshake a poem: the cell at
    #: report.TARGET_CONCURRENCY, and every other concurrency.  A handshake
    #: costs the load generator more CPU than a whole plain poem costs it,
    #: so these are durations, not the plain target's million poems.
    tls_target: Load
    tls_other: Load
    #: At least this many rounds; see rounds().
    min_rounds: int = 1
    #: A slice whose cores were busier than this with other work (others_pct)
    #: is measured again, up to ``retries`` more times; the quietest counts.
    quiet_pct: float = 5.0
    retries: int = 0

    def rounds(self, servers: int) -> int:
        """How many rounds for this many servers taking turns.

        A multiple of the number of servers, so that with the order rotated
        by one each round every server is first, second... and last equally
        often; and at least min_rounds, so that a single server's cell still
        shows how steady it was.
        """
        servers = max(1, servers)
        return servers * math.ceil(self.min_rounds / servers)


FULL = Plan(
    concurrencies=(1, 16, 64, 256),
    target=Load(poems=1_000_000, warm_up_seconds=1.0),
    other=Load(seconds=5.0, warm_up_seconds=1.0),
    big_concurrency=16,
    big=Load(seconds=5.0, warm_up_seconds=1.0),
    cold_repeats=15,
    logging=Load(seconds=6.0, warm_up_seconds=1.0),
    workers=Load(seconds=5.0, warm_up_seconds=1.0),
    count=Load(seconds=0.25),
    breakdown=Load(seconds=2.0),
    tls_target=Load(seconds=20.0, warm_up_seconds=1.0),
    tls_other=Load(seconds=5.0, warm_up_seconds=1.0),
    min_rounds=4,
    retries=2,
)

SMOKE = Plan(
    concurrencies=(1, 64),
    target=Load(poems=2000, warm_up_poems=200),
    other=Load(poems=2000, warm_up_poems=200),
    big_concurrency=16,
    big=Load(poems=100, warm_up_poems=16),
    cold_repeats=3,
    logging=Load(poems=2000, warm_up_poems=200),
    workers=Load(poems=2000, warm_up_poems=200),
    count=Load(poems=300),
    breakdown=Load(poems=500),
    tls_target=Load(poems=500, warm_up_poems=64),
    tls_other=Load(poems=300, warm_up_poems=16),
    min_rounds=2,
)


def split(amount: Load, rounds: int) -> list[Load]:
    """``amount`` cut into one slice per round, without its warm-up (which comes once, before the first)."""
    if amount.poems is not None:
        share, left = divmod(amount.poems, rounds)
        return [Load(poems=share + (1 if r < left else 0)) for r in range(rounds)]
    assert amount.seconds is not None
    return [Load(seconds=amount.seconds / rounds) for _ in range(rounds)]


def describe_load(amount: Load) -> str:
    what = f"{amount.poems:,} poems" if amount.poems is not None else f"{amount.seconds:g} s"
    if amount.warm_up_poems:
        return f"{what} after a warm-up of {amount.warm_up_poems:,} poems"
    if amount.warm_up_seconds:
        return f"{what} after a {amount.warm_up_seconds:g} s warm-up"
    return what


def describe_rounds(amount: Load, rounds: int) -> str:
    """``amount`` as run in ``rounds``: "1,000,000 poems after a 1 s warm-up, in 5 rounds of 200,000"."""
    if rounds <= 1:
        return describe_load(amount)
    slices = split(amount, rounds)
    first = slices[0]
    each = f"{first.poems:,}" if first.poems is not None else f"{first.seconds:.3g} s"
    about = "" if len(set(slices)) == 1 else "about "
    return f"{describe_load(amount)}, in {rounds} rounds of {about}{each}"

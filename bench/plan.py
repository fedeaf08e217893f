"""What a run measures, and how much: the full run and the smoke run."""

from __future__ import annotations

from dataclasses import dataclass

from measure import Load


@dataclass(frozen=True)
class Plan:
    """The concurrencies, and the load of each kind of cell."""

    concurrencies: tuple[int, ...]
    target: Load  # the cell at report.TARGET_CONCURRENCY
    other: Load  # every other concurrency
    big_concurrency: int
    big: Load
    cold_repeats: int
    logging: Load  # one round of one log level
    logging_rounds: int  # the levels take turns, this many times
    workers: Load
    #: A cell whose cores were busier than this with other work (others_pct)
    #: is measured again, up to ``retries`` more times; the quietest counts.
    quiet_pct: float = 5.0
    retries: int = 0


FULL = Plan(
    concurrencies=(1, 16, 64, 256),
    target=Load(poems=1_000_000, warm_up_seconds=1.0),
    other=Load(seconds=5.0, warm_up_seconds=1.0),
    big_concurrency=16,
    big=Load(seconds=5.0, warm_up_seconds=1.0),
    cold_repeats=15,
    logging=Load(seconds=2.0, warm_up_seconds=1.0),
    logging_rounds=3,
    workers=Load(seconds=5.0, warm_up_seconds=1.0),
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
    logging_rounds=1,
    workers=Load(poems=2000, warm_up_poems=200),
)


def describe_load(amount: Load) -> str:
    what = f"{amount.poems:,} poems" if amount.poems is not None else f"{amount.seconds:g} s"
    if amount.warm_up_poems:
        return f"{what} after a warm-up of {amount.warm_up_poems:,} poems"
    if amount.warm_up_seconds:
        return f"{what} after a {amount.warm_up_seconds:g} s warm-up"
    return what

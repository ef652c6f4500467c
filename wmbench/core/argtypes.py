"""argparse types that refuse empty and absurd values at parse time, with the accepted range.

Parse time is the one place every path goes through: the real run, `--check`, and a sweep's check of each
of its runs' command lines. An empty path used to mean the current folder, `--batch 0` automatic and
`--steps 1000000000000` a 1,300-year run; each is now `error: argument --flag: ...` and exit 2."""
from __future__ import annotations

import argparse

MAX_COUNT = 10**9      # steps, windows, episodes: more is a typo, not a plan
MAX_SEED = 2**31 - 1   # gymnasium and ALE seed with signed 32-bit ints


def path(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return s


def int_in(lo: int, hi: int | None = MAX_COUNT):
    """An integer in [lo, hi] (hi None: a callable's bound, read when parsing, e.g. the core count)."""
    def parse(s: str) -> int:
        top = hi() if callable(hi) else hi
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo:,}, {top:,}], got {s!r}") from None
        if not lo <= v <= top:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo:,}, {top:,}], got {v:,}")
        return v
    parse.__name__ = "int"       # argparse names the type in its messages
    return parse


def threads(s: str) -> int:
    from wmbench.core.device import max_threads
    return int_in(0, max_threads)(s)


def int_list(lo: int, hi: int):
    """A comma-separated list of integers, each in [lo, hi]."""
    one = int_in(lo, hi)

    def parse(s: str) -> list[int]:
        return [one(v.strip()) for v in s.split(",") if v.strip()]
    parse.__name__ = "list of int"
    return parse


seeds = int_list(0, MAX_SEED)
seed = int_in(0, MAX_SEED)
count = int_in(1)             # a positive count: steps, batch, layers, widths
count0 = int_in(0)            # zero allowed: warm-up, evaluation every N (0: none)

"""Published Atari100k baselines, one score per run, as released by their authors.

Each method is a packaged CSV, wmbench/data/baselines/<method>.csv, with columns game, run, score
(raw game score, not human-normalised). Where each one comes from, what its score is and how it
was converted: wmbench/data/baselines/SOURCES.md.
"""
from __future__ import annotations

import io
from importlib import resources

import pandas as pd


def _folder():
    return resources.files("wmbench").joinpath("data/baselines")


def list_baselines() -> list[str]:
    """Names of the packaged methods, sorted (e.g. 'DreamerV3', 'IRIS', 'SPR')."""
    return sorted(f.name[:-len(".csv")] for f in _folder().iterdir() if f.name.endswith(".csv"))


def baseline_scores(method: str) -> pd.DataFrame:
    """Per-run scores of one method: columns game (str), run (int), score (float)."""
    methods = list_baselines()
    if method not in methods:
        raise ValueError(f"unknown baseline {method!r}; valid: {', '.join(methods)}")
    text = _folder().joinpath(f"{method}.csv").read_text()
    return pd.read_csv(io.StringIO(text), dtype={"game": str, "run": int, "score": float})

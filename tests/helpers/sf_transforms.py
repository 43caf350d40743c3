"""Transforms the tests name by import path (tests/helpers is put on sys.path)."""

from __future__ import annotations

import pandas as pd


def add_feature_sum(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["feature_sum"] = out["f0"] + out["f1"]
    return out


def drop_negative_f0(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["f0"] >= 0]


def duplicate_rows(df: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([df, df], ignore_index=True)


def not_a_frame(df: pd.DataFrame) -> int:
    return 3


def sleep_per_block(df: pd.DataFrame) -> pd.DataFrame:
    """Seven seconds a block, more than a node's timeout: a heavy transform."""
    import time

    time.sleep(7.0)
    return df


def broken(df: pd.DataFrame) -> pd.DataFrame:
    raise ValueError("the transform broke (injected)")


def two_seconds_per_block(df: pd.DataFrame) -> pd.DataFrame:
    """Two seconds a block: a CPU-light stand-in for a heavy transform, so that a batch
    lasts long enough for several children to be working at once."""
    import time

    time.sleep(2.0)
    return df

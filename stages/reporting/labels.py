"""The recipe label of report rows, shared by the tables and the plots."""

from __future__ import annotations

import pandas as pd


def recipe_column(rows: pd.DataFrame) -> pd.Series:
    """The ``recipe`` column ("" where rows built by hand lack it, or a CSV read it as NaN)."""
    return rows["recipe"].fillna("") if "recipe" in rows else pd.Series("", index=rows.index)


def with_recipe(label: str, recipe: str) -> str:
    """``label`` with its recipe in brackets where there is one."""
    return f"{label} [{recipe}]" if recipe else label

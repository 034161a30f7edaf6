"""Fixed-width text tables, as printed by the CLI, the benchmarks and the evaluation reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["text_table"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else (f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}")
    return str(value)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Fixed-width text table: first column left-aligned, the others right-aligned; floats to 3 decimals."""
    cells = [[str(h) for h in header], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    text = ["  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))) for r in cells]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)

"""Strict JSON for every file zoo writes: NaN and infinities become ``null`` with one warning naming them."""
from __future__ import annotations

import json
import math
import sys
from typing import Any


def finite_or_null(value: Any, path: str, replaced: list[str]) -> Any:
    """``value`` with every non-finite float replaced by None; each replacement's dotted path goes to ``replaced``."""
    if isinstance(value, float) and not math.isfinite(value):
        replaced.append(f"{path}={value}")
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item, f"{path}.{key}" if path else str(key), replaced)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item, f"{path}[{i}]", replaced) for i, item in enumerate(value)]
    return value


def dumps_strict(value: Any, where: str, indent: int | None = 2) -> str:
    """``json.dumps`` that never writes the non-standard ``NaN``/``Infinity``: they become ``null``, with a warning
    on stderr naming ``where`` (the file or stream) and the fields."""
    replaced: list[str] = []
    clean = finite_or_null(value, "", replaced)
    if replaced:
        print(f"warning: {where}: non-finite values written as null: {', '.join(replaced)}", file=sys.stderr,
              flush=True)
    return json.dumps(clean, indent=indent, allow_nan=False)

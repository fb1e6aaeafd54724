"""Layer selection by name, shared by torchslim.patch and torchslim.sparse.prune_."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable


def as_patterns(value: str | Iterable[str] | None, arg: str) -> list[str]:
    """``value`` (argument ``arg``: None, a name pattern or several) as a list of patterns."""
    if value is None:
        return []
    if not isinstance(value, (str, Iterable)):
        raise TypeError(f"{arg} must be a name pattern or a list of them, got {value!r}")
    patterns = [value] if isinstance(value, str) else list(value)
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"{arg} must be a name pattern or a list of them, got {p!r}")
    return patterns


def name_matches(name: str, pattern: str) -> bool:
    """True when ``name`` equals ``pattern``, matches it as a glob, or fully as a regex."""
    if name == pattern or fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False

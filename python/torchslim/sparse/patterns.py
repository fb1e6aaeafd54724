"""Sparsity patterns: what a pruned weight may look like, and the check that it does.

A weight is (N, K), one row per output feature, K the reduction dim. Patterns:

    "2:4"            semi-structured: in every group of 4 consecutive weights along K at most 2
                     are nonzero (sparsity 50%). Any "n:m" with 0 < n < m parses; the kernels
                     take 2:4. When K % m != 0 the last group is the K % m weights left, and
                     may keep at most n of them.
    "unstructured"   any weight; a sparsity in (0, 1) says how many to prune.
    "RxC"            block-sparse, e.g. "1x16" or "4x4" (also a tuple (R, C)): whole R x C
                     blocks are pruned or kept. Blocks at the edges are cut off by N and K.

``check_pattern`` rejects a weight that breaks its pattern with a ValueError that names the
first offending group; a non-conforming weight is never silently re-pruned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern (see the module docstring)."""

    kind: str  # "n:m", "unstructured" or "block"
    n: int = 0  # n:m: kept per group
    m: int = 0  # n:m: group size along K
    block: tuple[int, int] = (1, 1)  # block: (rows, cols)

    def __post_init__(self) -> None:
        def whole(*values) -> bool:
            return all(isinstance(v, int) and not isinstance(v, bool) for v in values)

        if self.kind == "n:m":
            if not (whole(self.n, self.m) and 0 < self.n < self.m):
                raise ValueError(f"an n:m Pattern must have ints 0 < n < m, got {self!r}")
        elif self.kind == "block":
            block = self.block
            if (
                not (isinstance(block, tuple) and len(block) == 2 and whole(*block))
                or min(block) < 1
            ):
                raise ValueError(f"a block Pattern must have block (R, C) >= 1, got {self!r}")
        elif self.kind != "unstructured":
            raise ValueError(
                f"Pattern kind must be 'n:m', 'unstructured' or 'block', got {self.kind!r}"
            )

    def __str__(self) -> str:
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"{self.block[0]}x{self.block[1]}"
        return "unstructured"

    @property
    def sparsity(self) -> float | None:
        """The sparsity the pattern fixes (n:m), else None."""
        return 1.0 - self.n / self.m if self.kind == "n:m" else None


_NM = re.compile(r"(\d+):(\d+)")
_BLOCK = re.compile(r"(\d+)x(\d+)")


def parse_pattern(pattern: str | tuple[int, int] | Pattern) -> Pattern:
    """ "2:4" / "n:m", "unstructured", "RxC" or (R, C) -> Pattern; anything else: ValueError."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, tuple) and len(pattern) == 2:
        rows, cols = pattern
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rows, cols)):
            raise TypeError(f"pattern as a block must be (rows, cols) of ints, got {pattern!r}")
        pattern = f"{rows}x{cols}"
    if not isinstance(pattern, str):
        raise TypeError(
            "pattern must be a string ('2:4', 'unstructured', '4x4') or a (rows, cols) "
            f"tuple, got {type(pattern).__name__}"
        )
    text = pattern.strip().lower()
    if text == "unstructured":
        return Pattern("unstructured")
    if match := _NM.fullmatch(text):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"pattern n:m must have 0 < n < m, got {pattern!r}")
        return Pattern("n:m", n=n, m=m)
    if match := _BLOCK.fullmatch(text):
        rows, cols = int(match[1]), int(match[2])
        if rows < 1 or cols < 1:
            raise ValueError(f"pattern block RxC must have R, C >= 1, got {pattern!r}")
        if rows == cols == 1:
            return Pattern("unstructured")
        return Pattern("block", block=(rows, cols))
    raise ValueError(
        f"pattern must be '2:4' (or 'n:m'), 'unstructured' or a block 'RxC' such as '4x4', "
        f"got {pattern!r}"
    )


def resolve_sparsity(pattern: Pattern, sparsity: float | None) -> float:
    """The sparsity to prune to: n:m fixes it (a given value must agree); the others need a
    float in (0, 1)."""
    if sparsity is not None and (
        isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
    ):
        raise TypeError(f"sparsity must be a float, got {type(sparsity).__name__}")
    fixed = pattern.sparsity
    if fixed is not None:
        if sparsity is not None and abs(sparsity - fixed) > 1e-9:
            raise ValueError(
                f"sparsity must be {fixed:g} (or None) for pattern {pattern}, got {sparsity}"
            )
        return fixed
    if sparsity is None:
        raise ValueError(f"sparsity is required for pattern {pattern} (a float in (0, 1))")
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    return float(sparsity)


def nm_group_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros per group of m along K: (N, ceil(K / m)) int64 (the last group may be short)."""
    n_rows, k = weight.shape
    nonzero = weight != 0
    pad = -k % m
    if pad:
        nonzero = torch.nn.functional.pad(nonzero, (0, pad))
    return nonzero.reshape(n_rows, -1, m).sum(dim=-1)


def check_pattern(
    weight: torch.Tensor, pattern: str | tuple[int, int] | Pattern, name: str = "weight"
) -> Pattern:
    """Raises ValueError unless ``weight`` (N, K) satisfies ``pattern``; returns the Pattern.

    n:m checks every group; "unstructured" and blocks hold for any weight (a block format
    stores every block that has a nonzero).
    """
    parsed = parse_pattern(pattern)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if parsed.kind != "n:m" or weight.numel() == 0:
        return parsed
    counts = nm_group_counts(weight.detach(), parsed.m)
    bad = counts > parsed.n
    if bool(bad.any()):
        row, group = (int(v) for v in bad.nonzero()[0])
        last = min(group * parsed.m + parsed.m, weight.shape[1]) - 1  # a short last group
        raise ValueError(
            f"{name} does not satisfy the {parsed} pattern: {int(bad.sum())} of {bad.numel()} "
            f"groups of {parsed.m} have more than {parsed.n} nonzeros (first: row {row}, "
            f"columns {group * parsed.m}..{last} have "
            f"{int(counts[row, group])}); prune it first with torchslim.sparse.prune_"
        )
    return parsed

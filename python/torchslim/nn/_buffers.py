"""What the quantized and sparse layers share about their buffers: loading them, checking them
after a load, and moving them with the module while some keep their dtype.

Everything registered on a module here is a module-level function or a small class, never a
closure, so the layers pickle (``torch.save(model)``) like nn.Linear does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

# A buffer seen as the integer type of its width: Module._apply's functions change the device
# of such a tensor (or make an empty one, to_empty) and never its dtype.
_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class CodesKeepTheirDtype:
    """A load_state_dict pre-hook for the integer codes in buffer ``name``: load_state_dict
    would cast a tensor of any dtype into it (float weights truncated to codes, wider integers
    wrapped), so another dtype is refused by name."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype

    def __call__(self, module: nn.Module, state_dict, prefix, *_args) -> None:
        codes = state_dict.get(prefix + self.name)
        if isinstance(codes, torch.Tensor) and codes.dtype != self.dtype:
            raise ValueError(
                f"{prefix + self.name} must hold {self.dtype} codes, got {codes.dtype} (a float "
                f"weight is quantized by {type(module).__name__}.from_linear)"
            )


def validate_after_load(module: nn.Module, _incompatible_keys) -> None:
    """A load_state_dict post-hook: the layer checks the buffers it was given (``_validate``)."""
    module._validate()


def apply_keeping_dtypes(
    module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool,
    names: Iterable[str],
) -> nn.Module:  # fmt: skip
    """``nn.Module._apply(fn)`` for a layer whose buffers ``names`` keep their dtype (scales in
    fp32 when the module goes to bf16): those follow fn's device and nothing else, including
    to_empty() from the meta device."""
    kept = {name: module._buffers[name] for name in names}
    module._buffers.update(dict.fromkeys(kept))
    try:
        nn.Module._apply(module, fn, recurse)
    finally:
        module._buffers.update(kept)
    for name, t in kept.items():
        if t is not None:
            module._buffers[name] = fn(t.view(_SAME_WIDTH_INT[t.element_size()])).view(t.dtype)
    return module

"""Running calibration data through a model and watching the inputs of some of its layers;
shared by torchslim.patch (SmoothQuant) and torchslim.sparse.prune_ (Wanda)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def watch_inputs(
    model: nn.Module,
    layers: Iterable[nn.Module],
    collect: Callable[[nn.Module, torch.Tensor], None],
    calibration: Iterable | Callable[[nn.Module], object],
    progress: bool,
) -> None:
    """Runs ``calibration`` through ``model`` under no_grad, calling collect(layer, x) with the
    (detached) input x of each of ``layers`` every time it runs.

    ``calibration`` is an iterable of model inputs (a tensor runs model(t), a dict model(**d))
    or a callable run as calibration(model).
    """

    def hook(module, args, kwargs):
        collect(module, (args[0] if args else kwargs["input"]).detach())

    unique = {id(m): m for m in layers}
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in unique.values()]
    try:
        with torch.no_grad():
            if callable(calibration):
                calibration(model)
                return
            for batch in tqdm(calibration, desc="calibrate", disable=not progress):
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, torch.Tensor):
                    model(batch)
                else:
                    raise TypeError(
                        "calibration must yield tensors or dicts of model inputs, got "
                        f"{type(batch).__name__}"
                    )
    finally:
        for handle in handles:
            handle.remove()

"""Running calibration data through a model and watching the inputs of some of its layers;
shared by torchslim.patch (SmoothQuant) and torchslim.sparse.prune_ (Wanda)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def watch_inputs(
    model: nn.Module,
    layers: Iterable[tuple[str, nn.Module]],
    collect: Callable[[nn.Module, torch.Tensor], None],
    calibration: Iterable | Callable[[nn.Module], object],
    progress: bool,
) -> None:
    """Runs ``calibration`` through ``model`` under no_grad, calling collect(layer, x) with the
    (detached) input x of each of ``layers`` ((name, module) pairs) every time it runs.

    ``calibration`` is an iterable of model inputs (a tensor runs model(t), a dict model(**d))
    or a callable run as calibration(model). An empty input is not collected; one holding a NaN
    or an inf raises ValueError naming the layer (it would make every statistic NaN).
    """
    if isinstance(calibration, torch.Tensor):
        raise TypeError(
            "calibration must be an iterable of model inputs or a callable, got a Tensor (wrap "
            "one batch in a list: calibration=[batch])"
        )
    if not callable(calibration) and not isinstance(calibration, Iterable):
        raise TypeError(
            "calibration must be an iterable of model inputs or a callable, got "
            f"{type(calibration).__name__}"
        )
    names: dict[int, str] = {}  # a module's first name
    modules: dict[int, nn.Module] = {}
    for name, module in layers:  # read once: ``layers`` may be a generator
        names.setdefault(id(module), name)
        modules[id(module)] = module

    def hook(module, args, kwargs):
        x = (args[0] if args else kwargs["input"]).detach()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError(
                f"calibration gave layer {names[id(module)]!r} an input holding NaN or inf"
            )
        collect(module, x)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules.values()]
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

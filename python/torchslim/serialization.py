"""torchslim.save / torchslim.load: packed weights in safetensors plus a JSON recipe, no pickle.

    torchslim.save(model, "out/")        # out/model.safetensors + out/torchslim.json
    model = MyModel()                    # a fresh float model, on any device, or on "meta"
    torchslim.load(model, "out/")        # patched structure rebuilt, packed weights loaded

The recipe names every torchslim layer, the METHODS entry that made it and its constructor
arguments; load() swaps those layers into the fresh model (checking that each exists and has
the recorded shape) and loads the state dict: the packed weights are read, never re-quantized,
so a round trip is bit-identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_model
from torch import nn

from torchslim.patching import METHODS, _set_submodule

FORMAT = "torchslim"
VERSION = 1
WEIGHTS = "model.safetensors"
RECIPE = "torchslim.json"


def _recipe(model: nn.Module) -> dict:
    layers = {}
    for name, module in model.named_modules():
        method = next((m for m in METHODS.values() if m.owns(module)), None)
        if method is not None and name:
            layers[name] = {"method": method.name, "config": method.config(module)}
    import torchslim

    return {
        "format": FORMAT,
        "version": VERSION,
        "torchslim": torchslim.__version__,
        "layers": layers,
    }


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Writes ``model`` (patched or not) to the directory ``path``.

    Files: ``model.safetensors`` (the whole state dict; tied tensors stored once) and
    ``torchslim.json`` (the recipe). Returns the directory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"path must be a directory (or not exist yet), got the file {out}")
    out.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(model)
    save_model(model, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def _read_recipe(directory: Path) -> dict:
    for name in (WEIGHTS, RECIPE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} not found: was it written by torchslim.save?"
            )
    try:
        recipe = json.loads((directory / RECIPE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / RECIPE} is not valid JSON: {exc}") from None
    if recipe.get("format") != FORMAT or recipe.get("version") != VERSION:
        raise ValueError(
            f"{directory / RECIPE} must have format={FORMAT!r} version={VERSION}, got "
            f"format={recipe.get('format')!r} version={recipe.get('version')!r}"
        )
    for name, entry in recipe["layers"].items():
        if entry.get("method") not in METHODS:
            raise ValueError(
                f"recipe layer {name!r} has method {entry.get('method')!r}; this torchslim "
                f"knows {sorted(METHODS)}"
            )
    return recipe


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuilds the saved torchslim structure on a fresh float ``model`` and loads the weights.

    Args:
        model: the float model the saved one was patched from (same architecture), on any
            device or on the meta device (its tensors are then replaced by the loaded ones).
        path: a directory written by :func:`save`.

    Returns:
        ``model``, patched in place. Raises ValueError when the model does not have a layer
        the recipe names, a shape differs, or the weights do not match the structure.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = Path(path)
    recipe = _read_recipe(directory)
    for name, entry in recipe["layers"].items():
        method = METHODS[entry["method"]]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the recipe names layer {name!r}, which the model does not have"
            ) from None
        if not isinstance(layer, method.applies_to):
            raise ValueError(
                f"layer {name!r} must be a {method.applies_to.__name__} to take method "
                f"{method.name!r}, got {type(layer).__name__}"
            )
        try:
            _set_submodule(model, name, method.empty(layer, entry["config"]))
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None

    tensors = [*model.parameters(), *model.buffers()]
    on_meta = any(t.is_meta for t in tensors)
    device = "cpu" if on_meta or not tensors else str(tensors[0].device)
    tensors_before = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    state = load_file(str(directory / WEIGHTS), device=device)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=on_meta)
    except RuntimeError as exc:
        raise ValueError(f"the saved weights do not fit the model: {exc}") from None
    if unexpected:
        raise ValueError(f"the saved weights have tensors the model lacks: {unexpected[:5]}")
    # Tied tensors are stored once; a key missing from the file must alias one that is there.
    loaded_ids = {tensors_before[k] for k in state if k in tensors_before}
    untied = [k for k in missing if tensors_before.get(k) not in loaded_ids]
    if untied:
        raise ValueError(f"the saved weights lack tensors the model has: {untied[:5]}")
    if on_meta and missing:
        tie = getattr(model, "tie_weights", None)
        if tie is None:
            raise ValueError(f"tied tensors {missing[:5]} cannot be re-tied on a meta-device model")
        tie()
    model.torchslim_recipe = recipe
    return model


__all__ = ["load", "save"]

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

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from torchslim._manifest import read_manifest
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
    recipe = read_manifest(directory, RECIPE, [WEIGHTS], FORMAT, VERSION, "torchslim.save")
    path = directory / RECIPE
    layers = recipe.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: 'layers' must be an object, got {type(layers).__name__}")
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            raise ValueError(f"{path}: layer {name!r} must have a 'method' and a 'config' object")
        if entry.get("method") not in METHODS:
            raise ValueError(
                f"{path}: layer {name!r} has method {entry.get('method')!r}; this torchslim "
                f"knows {sorted(METHODS)}"
            )
    return recipe


def _replacements(model: nn.Module, recipe: dict, path: Path) -> dict[str, nn.Module]:
    """The unfilled torchslim layer for every layer the recipe names; the model is unchanged."""
    layers = {}
    for name, entry in recipe["layers"].items():
        method = METHODS[entry["method"]]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{path}: the recipe names layer {name!r}, which the model does not have"
            ) from None
        if not isinstance(layer, method.applies_to):
            raise ValueError(
                f"{path}: layer {name!r} must be a {method.applies_to.__name__} to take method "
                f"{method.name!r}, got {type(layer).__name__}"
            )
        try:
            layers[name] = method.empty(layer, entry["config"])
        except KeyError as exc:
            raise ValueError(f"{path}: layer {name!r}: the config lacks {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: layer {name!r}: {exc}") from None
    return layers


def _read_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None


def _owner(key: str, layers: dict[str, nn.Module]) -> str | None:
    """The recipe layer whose state-dict key ``key`` is, else None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        if name in layers:
            return name
    return None


def _check_rest(
    model: nn.Module, rest: dict[str, torch.Tensor], path: Path, layers: dict, on_meta: bool
) -> None:
    """Checks the saved tensors of the layers the recipe does not name against the model's:
    every one the model has, of the same shape and kind; a tensor of the model's that is not
    saved must be tied to (the same tensor as) one that is."""
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if _owner(k, layers) is None}
    unexpected = [k for k in rest if k not in own]
    if unexpected:
        raise ValueError(f"{path} has tensors the model lacks: {unexpected[:5]}")
    for key, saved in rest.items():
        mine = own[key]
        if saved.shape != mine.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(saved.shape)}, the model's {tuple(mine.shape)}"
            )
        if saved.is_floating_point() != mine.is_floating_point():
            raise ValueError(f"{path}: {key} holds {saved.dtype}, the model's {mine.dtype}")
    loaded = {id(own[k]) for k in rest}
    missing = [k for k in own if k not in rest]
    untied = [k for k in missing if id(own[k]) not in loaded]
    if untied:
        raise ValueError(f"{path} lacks tensors the model has: {untied[:5]}")
    if on_meta and missing and getattr(model, "tie_weights", None) is None:
        raise ValueError(f"tied tensors {missing[:5]} cannot be re-tied on a meta-device model")


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuilds the saved torchslim structure on a fresh float ``model`` and loads the weights.

    Args:
        model: the float model the saved one was patched from (same architecture), on any
            device or on the meta device (its tensors are then replaced by the loaded ones).
        path: a directory written by :func:`save`.

    Returns:
        ``model``, patched in place. Raises ValueError, naming the file and the layer or
        tensor, when the model does not have a layer the recipe names, a shape differs, or the
        weights do not match the structure. Everything is checked, and the torchslim layers are
        filled, before the model is changed: a load that raises leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = Path(path)
    recipe = _read_recipe(directory)
    layers = _replacements(model, recipe, directory / RECIPE)

    tensors = [*model.parameters(), *model.buffers()]
    on_meta = any(t.is_meta for t in tensors)
    device = "cpu" if on_meta or not tensors else str(tensors[0].device)
    weights = directory / WEIGHTS
    state = _read_weights(weights, device)
    per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    rest = {}
    for key, tensor in state.items():
        owner = _owner(key, layers)
        if owner is None:
            rest[key] = tensor
        else:
            per_layer[owner][key[len(owner) + 1 :]] = tensor
    _check_rest(model, rest, weights, layers, on_meta)
    for name, layer in layers.items():  # not yet in the model
        try:
            layer.load_state_dict(per_layer[name], assign=on_meta)
        except (RuntimeError, ValueError) as exc:
            message = " ".join(str(exc).split())  # torch's spans lines
            raise ValueError(f"{weights}: layer {name!r}: {message}") from None

    originals = {name: model.get_submodule(name) for name in layers}
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    try:
        model.load_state_dict(rest, strict=False, assign=on_meta)
    except (RuntimeError, ValueError) as exc:
        for name, layer in originals.items():
            _set_submodule(model, name, layer)
        message = " ".join(str(exc).split())
        raise ValueError(f"{weights} does not fit the model: {message}") from None
    if on_meta and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.tie_weights()
    model.torchslim_recipe = recipe
    return model


__all__ = ["load", "save"]

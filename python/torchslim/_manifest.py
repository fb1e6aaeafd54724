"""The JSON manifest of a folder torchslim writes (torchslim.save, AOTCausalLM.save)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def read_manifest(
    directory: Path, manifest: str, files: Sequence[str], fmt: str, version: int, writer: str
) -> dict:
    """The JSON object in ``directory / manifest``, once every one of ``files`` is there and
    the object names ``fmt`` and ``version``. Errors name the file: FileNotFoundError for a
    missing one (written by ``writer``?), ValueError for a manifest that is not this format's."""
    for name in (manifest, *files):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: was it written by {writer}?")
    path = directory / manifest
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != fmt or meta.get("version") != version:
        raise ValueError(
            f"{path} must have format={fmt!r} version={version}, got "
            f"format={meta.get('format')!r} version={meta.get('version')!r}"
        )
    return meta

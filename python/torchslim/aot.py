"""Ahead-of-time compiled generation for Hugging Face causal LMs (torch.export + AOTInductor).

    model = torchslim.patch(AutoModelForCausalLM.from_pretrained(...), quant="int4", group_size=32)
    lm = torchslim.aot_compile(model, max_cache_len=1024)   # minutes: export + C++ compilation
    tokens = lm.generate(input_ids, max_new_tokens=64)      # greedy
    lm.save("smollm2-int4/")                                 # later: AOTCausalLM.load(...)

Why: eager decoding of a small model on a CPU is bound by the cost of each op call, not by
arithmetic or weight bytes (benchmarks/NOTES.md, "SmolLM2-135M decode"): a decode step of
SmolLM2-135M is ~2000 small ATen ops and 211 linear calls, each paying Python and dispatcher
overhead. torch.compile does not remove that on the CPU (guard evaluation and the Python
wrapper cost as much as they save). AOTInductor does: the whole step becomes one C++ function
whose fused loops and calls into torchslim's kernels (through the dispatcher, no Python) run
back to back.

torchslim's graph passes run on both programs (torchslim.compiler: q/k/v and gate/up
projections become one op each, since the weights are compile-time constants here).

Two programs share one static KV cache, which the returned AOTCausalLM owns and passes to both
as mutable inputs, so what the prompt writes, decode reads:

- prefill: (batch, S) tokens for any 2 <= S <= max_cache_len, logits of every position;
- decode: one token per sequence; static shapes but for the length of the filled cache.

Attention reads only the filled part of the cache (its length is a dynamic dimension of both
programs), so a step costs what its context costs, not what max_cache_len costs. A call names
the cache position of its first token; positions past the end of a call hold stale keys that
nothing reads, so a new prompt starts again at position 0 and a long prompt may be prefilled
in chunks. All sequences of a batch share positions: prompts must have equal lengths (no
padding mask).

Memory: each program loads its own copy of the model's constants (packed weights, embeddings),
and AOTInductor extracts each package to a temporary folder before loading it. SmolLM2-135M in
int4-g32 (197 MB of patched weights) is ~960 MB resident once loaded. Decode streams one copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torchslim import compiler, hf_attention
from torchslim._manifest import read_manifest
from torchslim.ops.attention import attention
from torchslim.ops.int8 import _require_tensors

FORMAT = "torchslim-aot"
VERSION = 1
MANIFEST = "torchslim_aot.json"
PROGRAMS = ("prefill", "decode")


def _static_cache(model: nn.Module, batch_size: int, max_cache_len: int):
    try:
        from transformers import StaticCache
    except ImportError:
        raise ImportError("aot_compile needs transformers: pip install transformers") from None
    if not hasattr(StaticCache, "early_initialization"):
        import transformers

        raise ImportError(
            f"aot_compile needs transformers >= 5 (StaticCache.early_initialization), "
            f"found {transformers.__version__}"
        )
    from transformers.cache_utils import StaticLayer
    from transformers.integrations.executorch import get_head_shapes

    config = model.config.get_text_config()
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    other = {type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer}
    if other:  # sliding-window and shared-KV layers keep positions differently
        raise NotImplementedError(
            f"aot_compile supports models whose every layer has a full attention cache; "
            f"{type(model).__name__} has {', '.join(sorted(other))} layers"
        )
    num_heads, head_dim = get_head_shapes(config)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    cache.early_initialization(batch_size, num_heads, head_dim, dtype, device)
    return cache


ATTENTION = "torchslim_static_cache"
FUSED_ATTENTION = "torchslim_static_cache_fused"  # for models on torchslim's attention


def _static_cache_attention(
    module, query, key, value, attention_mask, *, kv_length, scaling=None, **kwargs
):
    """Attention of ``query`` (batch, heads, S, dim) at positions ``kv_length - S ..
    kv_length - 1`` over the first ``kv_length`` positions of a static cache. The rest of the
    cache is not read, so a step costs what its context costs, not what ``max_cache_len``
    costs. Without a mask from transformers (it passes none when it takes the attention to be
    plainly causal) the causal mask is aligned bottom-right, so prefill may start anywhere. One
    query token with grouped KV heads attends as (kv heads, group) queries against the
    unexpanded cache; transformers would copy the cache once per query head while compiling."""
    n, (batch, heads, q_len, dim) = kv_length, query.shape
    key, value = key[:, :, :n], value[:, :, :n]
    if attention_mask is not None:
        attention_mask = attention_mask[..., :n]
    elif q_len > 1:
        rows = torch.arange(n - q_len, n, device=query.device).unsqueeze(1)
        attention_mask = torch.arange(n, device=query.device) <= rows
    groups = heads // key.shape[1]
    mask_per_head = (
        attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1
    )
    if q_len == 1 and groups > 1 and not mask_per_head:
        out = F.scaled_dot_product_attention(
            query.reshape(batch, heads // groups, groups, dim),
            key,
            value,
            attn_mask=attention_mask,
            scale=scaling,
        )
        return out.reshape(batch, 1, heads, value.shape[-1]), None
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=groups > 1
    )
    return out.transpose(1, 2).contiguous(), None


def _static_cache_fused_attention(
    module, query, key, value, attention_mask, *, kv_length, scaling=None, **kwargs
):
    """As _static_cache_attention, on torchslim's attention op: its causal mask is aligned
    bottom-right and it reads grouped KV heads unexpanded, so neither needs spelling out."""
    n, q_len = kv_length, query.shape[2]
    if attention_mask is not None:
        attention_mask = attention_mask[..., :n]
    out = attention(
        query,
        key[:, :, :n],
        value[:, :, :n],
        causal=attention_mask is None and q_len > 1,
        attn_mask=attention_mask,
        scale=None if scaling is None else float(scaling),
    )
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _static_cache_attention)
    AttentionInterface.register(FUSED_ATTENTION, _static_cache_fused_attention)


class _StaticCacheLM(nn.Module):
    """The exported module: ``(input_ids, kv_length, *kv) -> logits``.

    ``input_ids`` (batch, S) are the tokens at cache positions ``n - S .. n - 1`` where ``n`` is
    the length of ``kv_length`` (a tensor whose size, not content, is the argument: a dynamic
    dimension, so the programs need no data-dependent shapes). ``kv`` are the keys and values of
    each layer, in layer order; the new ones are written into them in place."""

    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int) -> None:
        super().__init__()
        self.model = model
        self.cache = _static_cache(model, batch_size, max_cache_len)

    def kv_templates(self) -> list[torch.Tensor]:
        return [t for layer in self.cache.layers for t in (layer.keys, layer.values)]

    def forward(self, input_ids: torch.Tensor, kv_length: torch.Tensor, *kv: torch.Tensor):
        n, length = kv_length.shape[0], input_ids.shape[1]
        positions = torch.arange(n - length, n)
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = kv[2 * i], kv[2 * i + 1]
            layer.cumulative_length = positions[0].clone()  # StaticLayer.update adds to it
        out = self.model(
            input_ids=input_ids,
            position_ids=positions.unsqueeze(0),
            past_key_values=self.cache,
            use_cache=True,
            kv_length=n,
        )
        return out.logits


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise TypeError(
            f"model must be a Hugging Face causal LM (a transformers PreTrainedModel with a "
            f"config), got {type(model).__name__}"
        )
    if not getattr(config.get_text_config(), "use_cache", True):
        raise ValueError("model.config.use_cache is False: aot_compile needs a KV cache")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def aot_compile(
    model: nn.Module,
    *,
    max_cache_len: int = 1024,
    batch_size: int = 1,
    passes: Sequence[str] | None = None,
    inductor_configs: dict | None = None,
    progress: bool = True,
) -> AOTCausalLM:
    """Exports ``model`` (a Hugging Face causal LM, patched or not) with a static KV cache of
    ``max_cache_len`` positions and compiles its prefill and decode programs with AOTInductor.

    Takes minutes on a CPU (C++ compilation of the whole model, twice). The model is not
    modified; the result does not reference it. A model on torchslim's attention
    (``torchslim.patch(model, attention=True)``) keeps it in the programs. ``passes``: the
    graph passes of the torchslim compile backend to run (torchslim.compiler; default all: a
    layer's q/k/v projections become one op, as do gate/up); ``inductor_configs`` go to
    ``torch._inductor.aoti_compile_and_package``.
    """
    from tqdm.auto import tqdm

    _check_model(model)
    configs = dict(inductor_configs or {})
    configs["post_grad_custom_pre_pass"] = compiler._pass_class()(
        compiler._pass_names(passes, "passes"), configs.get("post_grad_custom_pre_pass")
    )
    max_cache_len = _positive_int(max_cache_len, "max_cache_len")
    batch_size = _positive_int(batch_size, "batch_size")
    if max_cache_len < 4:  # the example inputs below fill 3 and 4 positions
        raise ValueError(f"max_cache_len must be >= 4, got {max_cache_len}")
    module = _StaticCacheLM(model, batch_size, max_cache_len)
    kv = module.kv_templates()
    examples = {  # (input_ids, kv_length): 3 tokens at positions 0..2; 1 token at position 3
        "prefill": (torch.zeros(batch_size, 3, dtype=torch.long), torch.empty(3)),
        "decode": (torch.zeros(batch_size, 1, dtype=torch.long), torch.empty(4)),
    }
    seq = torch.export.Dim("seq", min=2, max=max_cache_len)
    filled = torch.export.Dim("filled", min=2, max=max_cache_len)
    decoded = torch.export.Dim("decoded", min=1, max=max_cache_len)
    dynamic = {  # *kv is one argument: a tuple of static shapes
        "prefill": ({1: seq}, {0: filled}, (None,) * len(kv)),
        "decode": (None, {0: decoded}, (None,) * len(kv)),
    }
    work = Path(tempfile.mkdtemp(prefix="torchslim-aot-"))
    steps = tqdm(total=2 * len(PROGRAMS), desc="aot_compile", disable=not progress)
    _register_attention()
    own_attention, training = model.config._attn_implementation, model.training
    fused = own_attention == hf_attention.NAME
    model.set_attn_implementation(FUSED_ATTENTION if fused else ATTENTION)
    try:
        _export_and_compile(module.eval(), examples, dynamic, kv, work, configs, steps)
    except BaseException:  # a failed or interrupted compile leaves nothing behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        model.set_attn_implementation(own_attention)
        model.train(training)
        steps.close()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    meta = {
        "eos_token_id": [eos] if isinstance(eos, int) else list(eos or []),
        "batch_size": batch_size,
        "max_cache_len": max_cache_len,
        "vocab_size": int(model.config.get_text_config().vocab_size),
        "torch": torch.__version__,
        "kv": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in kv],
    }
    lm = AOTCausalLM(work, meta)
    weakref.finalize(lm, shutil.rmtree, work, ignore_errors=True)  # save() copies what it needs
    return lm


def _export_and_compile(module, examples, dynamic, kv, work, inductor_configs, steps) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # Pointing the cache layers at the kv inputs is a side effect Dynamo reports; intended.
        warnings.filterwarnings("ignore", "While compiling, we found certain side effects")
        # torch's own packaging code uses a pytree API it deprecates; nothing for users to do.
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        for name in PROGRAMS:
            steps.set_postfix_str(f"export {name}")
            program = torch.export.export(
                module, (*examples[name], *kv), dynamic_shapes=dynamic[name], strict=True
            )
            steps.update()
            steps.set_postfix_str(f"compile {name}")
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(work / f"{name}.pt2"),
                inductor_configs=inductor_configs,
            )
            steps.update()


class AOTCausalLM:
    """A causal LM compiled by :func:`aot_compile`: its two programs and its KV cache."""

    def __init__(self, directory: str | os.PathLike, meta: dict) -> None:
        directory = Path(directory)
        self.batch_size = int(meta["batch_size"])
        self.max_cache_len = int(meta["max_cache_len"])
        self.eos_token_id = [int(t) for t in meta.get("eos_token_id", [])]
        self.vocab_size = meta.get("vocab_size")  # None in manifests written before it was kept
        self._meta = meta
        self._dir = directory
        self._programs = {}
        for name in PROGRAMS:
            path = directory / f"{name}.pt2"
            try:
                self._programs[name] = torch._inductor.aoti_load_package(str(path))
            except RuntimeError as exc:
                raise RuntimeError(f"{path} could not be loaded: {exc}") from exc
        self._kv = [
            torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"]))
            for entry in meta["kv"]
        ]
        self._kv_length = torch.empty(self.max_cache_len)  # only its slices' sizes are read
        self._filled = 0  # cache positions written so far (a call may rewind, not skip)

    def __repr__(self) -> str:
        return (
            f"AOTCausalLM(batch_size={self.batch_size}, max_cache_len={self.max_cache_len}, "
            f"layers={len(self._kv) // 2})"
        )

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
        """Logits (batch, S, vocab) for ``input_ids`` (batch, S) written at cache positions
        ``position .. position + S - 1``; what the cache holds before ``position`` is the
        context."""
        _require_tensors(input_ids=input_ids)
        if input_ids.dtype != torch.long or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a 2-D int64 tensor (batch, seq), got "
                f"{input_ids.dim()}-D {input_ids.dtype}"
            )
        if input_ids.device != self._kv[0].device:
            raise ValueError(
                f"input_ids must be on the programs' device {self._kv[0].device}, got "
                f"{input_ids.device}"
            )
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(
                f"input_ids has batch {input_ids.shape[0]}, but this model was compiled for "
                f"batch_size={self.batch_size}"
            )
        length = input_ids.shape[1]
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"position must be a non-negative int, got {position!r}")
        if length == 0 or position + length > self.max_cache_len:
            raise ValueError(
                f"input_ids of length {length} at position {position} does not fit the cache "
                f"(max_cache_len={self.max_cache_len}, length >= 1)"
            )
        if position > self._filled:
            raise ValueError(
                f"position {position} is past the {self._filled} cache positions written so "
                f"far: a call continues the cache or rewinds it (position 0 starts over)"
            )
        if self.vocab_size is not None:
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"input_ids must be token ids in [0, {self.vocab_size}), got "
                    f"{low if low < 0 else high}"
                )
        program = self._programs["decode" if length == 1 else "prefill"]
        logits = program(input_ids.contiguous(), self._kv_length[: position + length], *self._kv)
        self._filled = position + length
        return logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        eos_token_id: int | list[int] | None = None,
        min_new_tokens: int = 0,
    ) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` (batch, S): returns (batch, S + n) with n <=
        ``max_new_tokens`` new tokens. Generation stops once every sequence has produced an end
        token (later tokens of a finished sequence repeat it), never before ``min_new_tokens``
        (until then no end token is chosen, as in transformers). End tokens: ``eos_token_id``,
        by default the model's ``generation_config.eos_token_id``; ``[]`` for none."""
        _require_tensors(input_ids=input_ids)
        max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int):
            raise ValueError(f"min_new_tokens must be an int, got {min_new_tokens!r}")
        if input_ids.dim() == 2 and input_ids.shape[1] + max_new_tokens > self.max_cache_len + 1:
            raise ValueError(
                f"input_ids of length {input_ids.shape[1]} plus max_new_tokens={max_new_tokens} "
                f"exceeds max_cache_len={self.max_cache_len} (+1: the last token is not cached)"
            )
        if eos_token_id is None:
            eos = self.eos_token_id
        else:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
            if not isinstance(eos, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos
            ):
                raise ValueError(
                    f"eos_token_id must be an int or a list of ints >= 0, got {eos_token_id!r}"
                )
        eos_ids = torch.tensor(eos, dtype=torch.long)
        # An end token outside the vocabulary can never be produced: nothing to hold back.
        vocab = self.vocab_size
        held_back = eos_ids if vocab is None else eos_ids[eos_ids < vocab]
        logits = self(input_ids, 0)[:, -1]
        position = input_ids.shape[1]
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for step in range(max_new_tokens):
            if step < min_new_tokens and eos:
                logits[:, held_back] = float("-inf")
            token = logits.argmax(-1)
            if eos:
                token = torch.where(done, out[-1][:, -1], token)
                done |= torch.isin(token, eos_ids)
            out.append(token.unsqueeze(1))
            if step + 1 == max_new_tokens or (eos and bool(done.all())):
                break
            logits = self(out[-1], position)[:, -1]
            position += 1
        return torch.cat(out, dim=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the two compiled packages and a manifest into the directory ``path``. The
        manifest goes last and records each package's size, so a folder left half-written (or
        with another model's files) fails to load with a clear error. The packages hold native
        code: load only folders you trust, as you would a shared library."""
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise ValueError(f"path must be a directory (or not exist yet), got the file {out}")
        out.mkdir(parents=True, exist_ok=True)
        sizes = {}
        for name in PROGRAMS:
            source, target = self._dir / f"{name}.pt2", out / f"{name}.pt2"
            if not (target.exists() and target.samefile(source)):  # saved where it was loaded
                (out / MANIFEST).unlink(missing_ok=True)  # the old manifest no longer holds
                partial = out / f".{name}.pt2.partial"
                shutil.copyfile(source, partial)
                os.replace(partial, target)
            sizes[name] = target.stat().st_size
        manifest = {"format": FORMAT, "version": VERSION, **self._meta, "bytes": sizes}
        partial = out / f".{MANIFEST}.partial"
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(partial, out / MANIFEST)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> AOTCausalLM:
        """Loads what :meth:`save` wrote (no model and no compilation needed)."""
        directory = Path(path)
        programs = [f"{p}.pt2" for p in PROGRAMS]
        meta = read_manifest(directory, MANIFEST, programs, FORMAT, VERSION, "AOTCausalLM.save")
        manifest = directory / MANIFEST
        missing = [key for key in ("batch_size", "max_cache_len", "kv") if key not in meta]
        if missing:
            raise ValueError(f"{manifest} lacks {missing}")
        built = meta.get("torch")
        if built is not None and built.split("+")[0] != torch.__version__.split("+")[0]:
            raise ValueError(
                f"{directory} was compiled by torch {built}; this is torch {torch.__version__}, "
                "and its compiled programs only load under the torch that built them: "
                "compile again"
            )
        for name, size in meta.get("bytes", {}).items():
            path = directory / f"{name}.pt2"
            if path.stat().st_size != size:
                raise ValueError(
                    f"{path} has {path.stat().st_size} bytes, but the manifest recorded {size}: "
                    "the folder holds another model's file, or a copy left half-written"
                )
        return cls(directory, meta)

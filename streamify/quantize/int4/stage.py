"""Stage ``quantize.int4``: weight-only INT4 (W4A16), group-wise, by RTN, GPTQ or AWQ.

The in-memory model after the stage holds the dequantized weights (so the
eval measures exactly what the artifact stores); the artifact is written in
the chosen format: compressed-tensors ``pack-quantized`` (transformers, vLLM)
or GGUF (llama.cpp). With ``entropy`` the compressed-tensors files are stored
entropy-coded (:mod:`streamify.codec.container`), the packed 4-bit codes included.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from streamify.arch import require
from streamify.codec.codec import DEFAULT_CHUNK_ELEMS, DEFAULT_LEVEL
from streamify.codec.container import CodedCheckpoint, code_checkpoint
from streamify.data.blocks import token_blocks
from streamify.data.sources import data_fingerprint, load_texts
from streamify.errors import InputError, UsageError
from streamify.io.artifact import output_lock
from streamify.io.atomic import save_torch
from streamify.io.cache import cache_root
from streamify.io.checkpoint import Checkpoint
from streamify.io.placement import DTYPE_NAMES, DTYPES
from streamify.model.blocks import block_tensors, find_blocks
from streamify.model.cast import cast_floats
from streamify.model.fingerprint import content_key, files_key
from streamify.model.params import count_params
from streamify.model.patterns import select_modules
from streamify.pipeline.registry import StageContext, register
from streamify.quantize.int4.awq import SAMPLE_ROWS, InputSample, fold_scales
from streamify.quantize.int4.calibrate import quantize_sequentially
from streamify.quantize.int4.compressed import PackedShards, write_compressed_tensors
from streamify.quantize.int4.gguf import check_exportable, check_vocab, round_like_gguf, write_gguf
from streamify.quantize.int4.gptq import HessianAccumulator, gptq
from streamify.quantize.int4.grid import Int4Weight, rtn, rtn_k, valid_group_sizes
from streamify.quantize.int4.kquant import SUPER

GGUF_GROUP = 32  # Q4_0 and Q4_1 blocks hold 32 weights
# With entropy: stored / plain bytes of packed 4-bit codes (3.58 bits a code, group 64) and of 16-bit floats
# (about 0.67), as measured on SmolLM2 (BENCHMARKS.md, "INT4 codes, entropy-coded"): the plan's estimate.
CODED_CODES = 3.58 / 4
CODED_FLOATS = 0.67


class Int4Params(BaseModel):
    """Params of ``quantize.int4``."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, description="weight bits: 4 (W4A16) is the one supported")
    method: Literal["rtn", "gptq", "awq"] = Field("gptq", description="rtn (no calibration), gptq or awq")
    group_size: int | Literal["auto"] = Field(
        "auto", description="weights per scale; auto: the largest of 128/64/32 dividing every target's input"
    )
    symmetric: bool = Field(
        True, description="symmetric (no zero point) or asymmetric groups", json_schema_extra={"cli": "--sym/--asym"}
    )
    targets: list[str] | None = Field(
        None, description="module patterns to quantize (default: every linear but the head)"
    )
    ignore: list[str] = Field(default_factory=list, description="module patterns to leave in floating point")
    samples: int = Field(64, ge=1, description="calibration sequences (gptq, awq)")
    seq_len: int = Field(512, ge=16, description="calibration sequence length (gptq, awq)")
    calibration_dtype: Literal["auto", "bf16"] = Field(
        "auto",
        description="calibration forward passes in the model's dtype, or bf16 autocast (faster on CPUs with AMX)",
    )
    damp: float = Field(0.01, gt=0, description="gptq: damping, a fraction of the mean Hessian diagonal")
    act_order: bool = Field(True, description="gptq: visit columns by decreasing Hessian diagonal (static groups)")
    weights_format: Literal["compressed-tensors", "gguf"] = Field(
        "compressed-tensors", description="artifact format: compressed-tensors pack-quantized, or GGUF"
    )
    gguf_type: Literal["Q4_0", "Q4_1", "Q4_K"] = Field(
        "Q4_0",
        description="gguf: Q4_0 (symmetric), Q4_1 (asymmetric) or Q4_K (asymmetric, 256-weight super-blocks with "
        "6-bit sub-block scales; a layer whose input is not a multiple of 256 is written Q4_1, as reported)",
    )
    gguf_embedding: Literal["Q8_0", "F16"] = Field(
        "Q8_0", description="gguf: the token embedding in Q8_0 (as llama.cpp's own quantizer stores it) or F16"
    )
    float_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="compressed-tensors: dtype of what stays in floating point (embedding, norms, head) and of "
        "the scales; auto: the model's half type, bf16 for an fp32 model",
    )
    blockwise: Literal["auto", "on", "off"] = Field(
        "auto",
        description="read, calibrate and write the model one block at a time from its safetensors files (for "
        "models larger than memory; compressed-tensors without entropy, no eval); auto: when the in-memory run "
        "would not fit in the memory available",
    )
    entropy: bool = Field(
        False,
        description="compressed-tensors: also entropy-code the 4-bit codes and float weights, losslessly "
        "(streamify's container: streamify.load reads it, streamify quantize decode restores the plain files)",
    )

    @field_validator("bits")
    @classmethod
    def _four_bits(cls, bits: int) -> int:
        if bits != 4:
            raise ValueError(f"only 4-bit weights are supported (W4A16), not {bits}-bit")
        return bits

    def blockwise_obstacle(self) -> str | None:
        """What in these params rules out a block-wise run, or None."""
        if self.weights_format == "gguf":
            return "GGUF artifacts are written from the model in memory"
        if self.entropy:
            return "entropy coding works on the whole artifact in memory"
        return None

    @model_validator(mode="after")
    def _format_grid(self) -> Int4Params:
        if self.blockwise == "on" and self.blockwise_obstacle():
            raise ValueError(f"blockwise on: {self.blockwise_obstacle()}; use blockwise off or auto")
        if self.weights_format == "compressed-tensors" and not self.symmetric:
            raise ValueError(
                "asymmetric compressed-tensors artifacts do not reload in transformers 5 with compressed-tensors "
                "0.20 (packed zero points meet an unpacked placeholder): use symmetric, or weights_format gguf "
                "with gguf_type Q4_1"
            )
        if self.weights_format != "gguf":
            return self
        if self.float_dtype != "auto":
            raise ValueError("float_dtype applies to compressed-tensors; gguf stores F16/F32 as llama.cpp does")
        if self.entropy:
            raise ValueError("entropy coding applies to compressed-tensors artifacts, not gguf (llama.cpp reads gguf)")
        if self.group_size not in (GGUF_GROUP, "auto"):
            raise ValueError(f"weights_format gguf stores blocks of {GGUF_GROUP} weights: use group_size 32 (or auto)")
        if self.symmetric != (self.gguf_type == "Q4_0"):
            raise ValueError("gguf_type Q4_0 is symmetric, Q4_1 and Q4_K asymmetric: set symmetric to match")
        return self


def _bytes_per_param(params: Int4Params, before: float, model) -> float:
    """Stored bytes per parameter: the targets at 4 bits plus their scales, the rest as the format keeps it."""
    targets = select_modules(model, params.targets, params.ignore, "quantize.int4 targets/ignore")
    modules = dict(model.named_modules())
    quantized = sum(modules[name].weight.numel() for name in targets)
    total = count_params(model)
    if params.weights_format == "gguf":
        embedding = model.get_input_embeddings().weight.numel()
        target_bytes = sum(modules[name].weight.numel() * _gguf_bytes(params, modules[name]) for name in targets)
        embedding_bytes = embedding * (34 / 32 if params.gguf_embedding == "Q8_0" else 2)
        return (target_bytes + embedding_bytes + (total - quantized - embedding) * 2) / total
    group = resolve_group_size(model, targets, params)
    floats = DTYPES[float_dtype_name(params, model)].itemsize
    codes, coded_floats = (CODED_CODES, CODED_FLOATS) if params.entropy else (1.0, 1.0)
    stored = quantized * (0.5 * codes + floats / group * coded_floats) + (total - quantized) * floats * coded_floats
    return stored / total


def _block_working_bytes(params: Int4Params, model) -> int:
    """Memory of calibrating one block: its inputs and outputs for the calibration set (fp32) and the
    statistics of its targets (GPTQ: a Hessian and the solver's copy per linear; AWQ: its input sample)."""
    if params.method == "rtn":
        return 0
    _, blocks = find_blocks(model)
    linears = [m for m in blocks[0].modules() if isinstance(m, nn.Linear)]
    activations = 2 * params.samples * params.seq_len * model.config.hidden_size * 4
    if params.method == "gptq":
        return activations + sum(2 * 4 * m.in_features**2 for m in linears)
    return activations + sum(4 * SAMPLE_ROWS * m.in_features for m in linears)


def uses_k_grid(params: Int4Params, linear: nn.Linear) -> bool:
    """Whether ``linear`` is written in Q4_K: asked for, and its rows fill whole 256-weight super-blocks."""
    return params.gguf_type == "Q4_K" and params.weights_format == "gguf" and linear.in_features % SUPER == 0


def _gguf_bytes(params: Int4Params, linear: nn.Linear) -> float:
    """GGUF bytes per weight of a quantized linear, its scales included (Q4_K falls back to Q4_1)."""
    if uses_k_grid(params, linear):
        return 144 / SUPER
    return {"Q4_0": 18, "Q4_1": 20, "Q4_K": 20}[params.gguf_type] / GGUF_GROUP


def float_dtype_name(params: Int4Params, model) -> str:
    """``float_dtype`` resolved: the model's half type when it has one, else bf16."""
    if params.float_dtype != "auto":
        return params.float_dtype
    return DTYPE_NAMES.get(model.dtype) if model.dtype in (torch.bfloat16, torch.float16) else "bf16"


def _plan_check(params: Int4Params, model, where: str) -> dict:
    """Targets, group size and (AWQ) the architecture's scale groups against the model, before any weight is read."""
    if params.method == "awq":
        require(model.config.model_type, "awq_groups", "AWQ", where)
    targets = select_modules(model, params.targets, params.ignore, "quantize.int4 targets/ignore")
    found = {"group_size": resolve_group_size(model, targets, params), "targets": len(targets)}
    if params.gguf_type == "Q4_K" and params.weights_format == "gguf":
        modules = dict(model.named_modules())
        found["q4_k_targets"] = sum(uses_k_grid(params, modules[name]) for name in targets)
    return found


def resolve_group_size(model, targets: list[str], params: Int4Params) -> int:
    """The group size to use: the asked one if it divides every target's input, else a clear error."""
    modules = dict(model.named_modules())
    inputs = {name: modules[name].in_features for name in targets}
    if params.weights_format == "gguf":
        wanted = GGUF_GROUP
    elif params.group_size == "auto":
        common = [g for g in (128, 64, 32) if all(n % g == 0 for n in inputs.values())]
        if not common:
            raise UsageError(
                "quantize.int4: no group size of 128, 64 or 32 divides every target layer's input",
                "ignore the odd layers (ignore: [...]) or quantize them separately",
            )
        return common[0]
    else:
        wanted = params.group_size
    for name, columns in inputs.items():
        if columns % wanted:
            raise UsageError(
                f"quantize.int4: group size {wanted} does not divide the input size {columns} of {name}",
                f"use group_size {' or '.join(map(str, valid_group_sizes(columns))) or 'a divisor'}"
                + ("" if params.weights_format == "gguf" else ", or group_size auto"),
            )
    return wanted


def _check_not_quantized(model, where: str) -> None:
    config = getattr(model, "config", None)
    method = getattr(getattr(config, "quantization_config", None), "quant_method", None)
    if method is None and isinstance(getattr(config, "quantization_config", None), dict):
        method = config.quantization_config.get("quant_method")
    method = getattr(method, "value", method)
    if method is not None and method != "gguf":
        raise InputError(
            f"{where}: the model is already quantized ({method}); INT4 needs floating-point weights",
            "start from the original floating-point checkpoint",
        )


@register(
    "quantize.int4",
    Int4Params,
    "weight-only INT4 (W4A16) by RTN, GPTQ or AWQ; compressed-tensors or GGUF artifact",
    relation="quantized",
    bytes_per_param=_bytes_per_param,
    check=_plan_check,
    applies=lambda model: (
        None
        if any(isinstance(m, nn.Linear) for m in (find_blocks(model) or ("", nn.ModuleList()))[1].modules())
        else "no linear layers in the model's blocks"
    ),
    final=True,
    blockwise=lambda params, model: (
        params.blockwise,
        params.blockwise_obstacle(),
        _block_working_bytes(params, model),
    ),
    progress_in_cache=True,
)
def quantize_int4(checkpoint: Checkpoint, params: Int4Params, ctx: StageContext) -> Checkpoint:
    """Quantize the target linears, leave dequantized weights in memory, and set the artifact writer."""
    model = checkpoint.model
    where = checkpoint.source.spec
    _check_not_quantized(model, where)
    if params.weights_format == "gguf":
        check_exportable(model, where)
        check_vocab(checkpoint)  # before calibration, not after it
    groups = None
    if params.method == "awq":
        arch = require(model.config.model_type, "awq_groups", "AWQ", where)
        groups = arch.awq_groups
        if arch.awq_note:
            ctx.metrics["awq_note"] = arch.awq_note
    targets = select_modules(model, params.targets, params.ignore, "quantize.int4 targets/ignore")
    group = resolve_group_size(model, targets, params)
    if params.group_size == "auto":
        ctx.progress.log(f"quantize.int4: group size {group} (auto: the largest of 128/64/32 dividing every target)")
    floats = None if params.weights_format == "gguf" else DTYPES[float_dtype_name(params, model)]
    scale_dtype = torch.float16 if floats is None else floats
    ids = None
    if params.method != "rtn":
        texts = load_texts(ctx.data, "train")
        wanted = params.samples * params.seq_len
        ids = token_blocks(
            checkpoint.tokenizer, texts, params.seq_len, wanted, seed=ctx.seed, where=f"--data {ctx.data}"
        )
        ctx.progress.log(
            f"calibrating on {ids.shape[0]} x {ids.shape[1]} tokens of {ctx.data}, block by block "
            f"(about {ids.numel() * model.config.hidden_size * 4 * 2 / 2**20:.0f} MiB of block inputs)"
        )
    modules = dict(model.named_modules())
    alphas: dict[str, dict[str, float]] = {}
    awq_skipped: dict[str, dict[str, str]] = {}
    unsupported: list[str] = []  # GPTQ targets without statistics (outside the blocks): RTN, reported
    settings = {"params": params.model_dump(mode="json"), "data": ctx.data, "seed": ctx.seed}
    # hashing the weights is only worth it when calibrating; a block-wise run keys its progress by the files
    resumable = ctx.use_cache and ids is not None and checkpoint.blocks is None
    checkpoint_dir = cache_root() / "calibrate" / content_key(model, settings) if resumable else None
    progress_dir = None
    if ctx.use_cache and checkpoint.blocks is not None and checkpoint.source.path.is_dir():
        loaded = {"dtype": str(checkpoint.blocks.dtype), "device": ctx.device.type, "text": data_fingerprint(ctx.data)}
        key = files_key(checkpoint.source.path, {**settings, **loaded})
        progress_dir = cache_root() / "calibrate" / f"blockwise-{key}"
        ctx.progress.log(
            f"quantize.int4: the run's progress is kept in {progress_dir} (the packed shards, up to the artifact's "
            "size, move into the artifact at the end), so a killed run resumes"
        )

    def solve_block(block, names, stats):
        if groups is not None:  # AWQ: scales folded first, then the same RTN as below
            if block is None:
                awq_skipped["(outside the blocks)"] = {name: "not in a block: plain RTN" for name in names}
            else:
                alphas[block], skipped = fold_scales(
                    modules, block, groups, names, stats, group, params.symmetric, scale_dtype
                )
                awq_skipped.update({block: skipped} if skipped else {})
        if params.method == "gptq":
            unsupported.extend(name for name in names if stats[name] is None)
        results = _solve(params, modules, names, stats, group, scale_dtype)
        for name, result in results.items():
            if params.weights_format == "gguf":  # fp16 scales, but llama.cpp multiplies in fp32
                result.scale = result.scale.float()
            modules[name].weight.copy_(result.dequantize(modules[name].weight.dtype))
        return results

    make_stats = {
        "gptq": lambda linear: HessianAccumulator(linear.in_features, linear.weight.device),
        "awq": lambda linear: InputSample(),
    }.get(params.method)
    compute = torch.bfloat16 if params.calibration_dtype == "bf16" else None
    if checkpoint.blocks is not None:
        solver = (make_stats, solve_block, compute)
        tallies = {"alphas": alphas, "awq_skipped": awq_skipped, "unsupported": unsupported}
        total = _quantize_from_disk(checkpoint, params, targets, group, floats, ids, solver, ctx, tallies, progress_dir)
    else:
        with torch.no_grad():
            quantized = quantize_sequentially(
                model, targets, ids, make_stats, solve_block, ctx.progress, compute, checkpoint_dir
            )
        total = sum(w.codes.numel() for w in quantized.values())
        if floats is not None:  # what the artifact stores: the rest in its float dtype
            ctx.metrics["float_dtype"] = DTYPE_NAMES[floats]
            kept = cast_floats(model, floats)
            if kept:
                ctx.metrics["kept_fp32"] = kept
        else:
            ctx.metrics["gguf_float_rounding"] = round_like_gguf(model, set(quantized), params.gguf_embedding)
        checkpoint.weights_writer = _writer(checkpoint, quantized, params, floats)
    if params.entropy:
        threads = os.cpu_count() or 1
        coded = code_checkpoint(checkpoint.weights_writer, DEFAULT_LEVEL, DEFAULT_CHUNK_ELEMS, threads, ctx.progress)
        checkpoint.weights_writer = coded.write
        ctx.metrics["entropy"] = coded.summary()
        ctx.metrics.update(_effective_bits(coded, total))
    if groups is not None:
        ctx.metrics["awq_alpha"] = {block: found for block, found in alphas.items() if found}
        ctx.metrics["awq_not_scaled"] = awq_skipped
        reasons = sorted({f"{group}: {why}" for skipped in awq_skipped.values() for group, why in skipped.items()})
        if reasons:
            ctx.progress.log(f"AWQ: not scaled in some blocks (see metrics awq_not_scaled): {'; '.join(reasons)}")
    if params.weights_format == "gguf" and params.gguf_type == "Q4_K":  # gguf: always in memory
        fallback = sorted(name for name, w in quantized.items() if w.super_scales is None)
        ctx.metrics["gguf_tensor_types"] = {"Q4_K": len(quantized) - len(fallback), "Q4_1": len(fallback)}
        if fallback:
            ctx.metrics["q4_1_instead_of_q4_k"] = fallback
            ctx.progress.log(
                f"Q4_K: {len(fallback)} of {len(quantized)} targets have inputs that are not a multiple of "
                f"{SUPER} and are written Q4_1 (as llama.cpp falls back for such rows; see metrics)"
            )
    if unsupported:
        ctx.metrics["rtn_without_statistics"] = unsupported
        ctx.progress.log(f"GPTQ: {len(unsupported)} targets saw no calibration inputs and were rounded (RTN)")
    ctx.metrics.update(
        method=params.method,
        group_size=group,
        symmetric=params.symmetric,
        weights_format=params.weights_format,
        quantized_modules=len(targets),
        quantized_weights=total,
    )
    return checkpoint


def _solve(params: Int4Params, modules, names, stats, group, scale_dtype) -> dict[str, Int4Weight]:
    """INT4 weights of one block's target linears: GPTQ where it has statistics, else RTN (AWQ's scales are in)."""
    results = {}
    for name in names:
        weight = modules[name].weight
        kquant = uses_k_grid(params, modules[name])
        if params.method == "gptq" and stats[name] is not None:
            hessian = stats[name].hessian
            results[name] = gptq(
                weight, hessian, group, params.symmetric, scale_dtype, params.damp, params.act_order, kquant
            )
        else:
            results[name] = rtn_k(weight) if kquant else rtn(weight, group, params.symmetric, scale_dtype)
    return results


def _effective_bits(coded: CodedCheckpoint, total: int) -> dict:
    """Stored bits per quantized weight: the coded 4-bit codes alone, and with their scales and zero points."""
    size = coded.stored_bytes()
    codes = sum(b for name, b in size.items() if name.endswith(".weight_packed"))
    side = sum(b for name, b in size.items() if name.endswith((".weight_scale", ".weight_zero_point")))
    return {"code_bits_per_weight": 8 * codes / total, "bits_per_weight": 8 * (codes + side) / total}


def _writer(checkpoint: Checkpoint, quantized: dict[str, Int4Weight], params: Int4Params, floats):
    if params.weights_format == "gguf":
        return lambda folder: write_gguf(checkpoint, quantized, params.gguf_type, folder, params.gguf_embedding)
    return lambda folder: write_compressed_tensors(checkpoint.model, quantized, params.symmetric, floats, folder)


def _quantize_from_disk(checkpoint, params, targets, group, floats, ids, solver, ctx, tallies, progress_dir) -> int:
    """Quantize a model loaded block-wise: each block is read, calibrated, quantized and written before the next
    is read; returns the number of quantized weights. With ``progress_dir`` the shards are written there and
    the run's state is kept every few blocks, so a killed run resumes (:class:`_BlockwiseProgress`); the shards
    move into the artifact folder at the end. The folder is locked until the run ends: another run of the same
    model, settings and data is refused while this one writes it."""
    model, executor = checkpoint.model, checkpoint.blocks
    folder = ctx.artifact_dir
    if folder is None:
        raise RuntimeError("quantize.int4 on a block-wise model needs the artifact folder (StageContext.artifact_dir)")
    if progress_dir is not None:
        ctx.run_resources.enter_context(
            output_lock(
                progress_dir, "block-wise progress (the same model, settings and data)",
                "wait for it: its artifact will be the same; or run this one without the cache (--no-cache)",
            )
        )  # fmt: skip
        progress_dir.mkdir(parents=True, exist_ok=True)
    shards = PackedShards(progress_dir or folder, model, targets, group, params.symmetric, floats)
    tallies["counted"] = []
    written = _BlockwiseProgress(progress_dir, shards, tallies, executor.device) if progress_dir else None

    def write_block(index: int, found: dict[str, Int4Weight]) -> None:
        shards.add(block_tensors(model, executor.prefix, index), found)
        tallies["counted"].extend(w.codes.numel() for w in found.values())

    make_stats, solve_block, compute = solver
    with torch.no_grad():
        outside = quantize_sequentially(
            model,
            targets,
            ids,
            make_stats,
            solve_block,
            ctx.progress,
            compute,
            executor=executor,
            finish_block=write_block,
            written=written,
        )
        shards.add(block_tensors(model, executor.prefix, None), outside)
        executor.release_embeddings()  # packed into the last shard: not needed again
    ctx.progress.log(f"quantize.int4: read, quantized and wrote {len(executor.blocks)} blocks one at a time")
    ctx.metrics.update(path="block-wise", float_dtype=DTYPE_NAMES[floats])
    if shards.kept:
        ctx.metrics["kept_fp32"] = shards.kept

    def finish(into: Path) -> None:
        shards.finish(model, into)
        if progress_dir is not None:
            shutil.rmtree(progress_dir, ignore_errors=True)

    checkpoint.weights_writer = finish
    return sum(tallies["counted"]) + sum(w.codes.numel() for w in outside.values())


class _BlockwiseProgress:
    """A block-wise run's progress in ``folder`` (:class:`~streamify.quantize.int4.calibrate.WrittenBlocks`):
    the shards written so far, the tensors waiting for the next shard, the run's tallies (AWQ scales, GPTQ
    targets without statistics, quantized weights) and the next block's inputs."""

    def __init__(self, folder: Path, shards: PackedShards, tallies: dict, device: torch.device) -> None:
        self.folder, self.shards, self.tallies, self.device = folder, shards, tallies, device

    def resume(self) -> tuple[int, list | None]:
        extra = self.shards.restore_state(self.folder)
        if extra is None:
            return 0, None
        for name, value in extra["tallies"].items():
            if isinstance(self.tallies[name], dict):
                self.tallies[name].update(value)
            else:
                self.tallies[name].extend(value)
        path = self.folder / f"inputs-{extra['next_block']}.pt"
        return extra["next_block"], torch.load(path, weights_only=True, map_location=self.device)

    def save(self, next_block: int, inputs: list | None) -> None:
        path = self.folder / f"inputs-{next_block}.pt"
        save_torch(inputs, path)
        self.shards.save_state(self.folder, next_block, {"next_block": next_block, "tallies": self.tallies})
        for older in self.folder.glob("inputs-*.pt"):
            if older != path:
                older.unlink(missing_ok=True)

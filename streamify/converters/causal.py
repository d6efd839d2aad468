"""Stage ``convert.causal``: an encoder made chunk-causal by a block-causal mask, adapted by causal LoRA.

Whisper (CarelessWhisper; :mod:`streamify.converters.causal_speech`): chunks of
20 ms frames, multi-latency training over ``chunk_ms_list``, for streaming
speech recognition. Text encoders (BERT-like;
:mod:`streamify.converters.causal_encoder`): chunks of ``chunk_tokens`` tokens.
Which attention takes the mask comes from the arch adapter
(:class:`~streamify.arch.EncoderAttention`). The adapters are merged into plain
weights; the chunk spec goes into ``config.json`` (``streamify_chunk_causal``),
the manifest and the card, and :func:`streamify.load` gives the model back
with the mask on. Options of the other family are refused, not ignored.
"""

from __future__ import annotations

from streamify.arch import require
from streamify.converters.causal_params import SPEECH_ONLY, TEXT_ONLY, CausalParams
from streamify.errors import UsageError
from streamify.io.checkpoint import Checkpoint
from streamify.pipeline.registry import StageContext, register
from streamify.runtime.chunk_causal import CONFIG_KEY, enable_chunk_causal, set_chunks
from streamify.runtime.speech_encoder import chunk_json


def _is_speech(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _plan_check(params: CausalParams, model, where: str) -> dict:
    model_type = getattr(model.config, "model_type", None)
    arch = require(model_type, "encoder_attention", "convert.causal (a chunk-causal encoder)", where)
    speech = _is_speech(model)
    if speech and model_type != "whisper":
        raise UsageError(
            f"{where}: convert.causal trains encoder-decoders the Whisper way; this is a '{model_type}'",
            "use a Whisper checkpoint (a transformers folder or a CTranslate2 one)",
        )
    fields = CausalParams.model_fields
    other = TEXT_ONLY if speech else SPEECH_ONLY
    foreign = [name for name in other if getattr(params, name) != fields[name].get_default(call_default_factory=True)]
    if foreign:
        family = "a speech model" if speech else "a text encoder"
        raise UsageError(
            f"{where}: {', '.join(foreign)} do not apply to {family} ('{model_type}')",
            f"leave them out; {family} takes: {', '.join(SPEECH_ONLY if speech else TEXT_ONLY)}",
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if not speech and isinstance(positions, int) and params.seq_len > positions:
        raise UsageError(
            f"{where}: --seq-len {params.seq_len} is longer than the model's {positions} positions (config.json)",
            f"use --seq-len {positions} or less",
        )
    specs = params.specs(speech)
    if speech:
        resolved: dict = {"chunk_ms": [chunk_json(spec)["chunk_ms"] for spec in specs]}
    else:
        resolved = {"chunk_tokens": specs[0].chunk_frames}
    return {**resolved, "lora_targets": list(arch.encoder_attention.projections)}


@register(
    "convert.causal",
    CausalParams,
    "chunk-causal encoder (block-causal mask) adapted by causal LoRA fine-tuning: Whisper for streaming ASR, "
    "BERT-like text encoders",
    relation="finetune",
    kinds=("speech-seq2seq", "encoder"),
    check=_plan_check,
    trains=lambda p: p.steps > 0,
)
def convert_causal(checkpoint: Checkpoint, params: CausalParams, ctx: StageContext) -> Checkpoint:
    """Mask the encoder chunk-causally; with ``steps`` > 0, train LoRA adapters to work under the mask."""
    from streamify.converters.causal_encoder import train_text_encoder
    from streamify.converters.causal_speech import train_speech

    model = checkpoint.model
    resolved = _plan_check(params, model, checkpoint.source.spec)
    set_chunks(model, None)  # a chunk-causal source starts again from its bidirectional form
    speech = _is_speech(model)
    specs = params.specs(speech)
    projections = tuple(resolved.pop("lora_targets"))
    metrics: dict = dict(resolved)
    if params.steps and speech:
        model, trained = train_speech(checkpoint, params, specs, projections, ctx)
        metrics.update(trained)
    elif params.steps:
        model, trained = train_text_encoder(checkpoint, params, specs[0], projections, ctx)
        metrics.update(trained)
    enable_chunk_causal(model, specs[0])
    stored = {**chunk_json(specs[0]), "trained_chunk_ms": metrics["chunk_ms"]} if speech else specs[0].to_json()
    setattr(model.config, CONFIG_KEY, stored)
    checkpoint.model = model
    ctx.metrics.update(metrics)
    return checkpoint

"""Stage ``convert.causal``: a chunk-causal Whisper through causal LoRA fine-tuning (CarelessWhisper).

The encoder gets the block-causal mask of :mod:`streamify.runtime.speech_encoder`;
LoRA adapters (peft) on the attention projections (encoder self-attention,
decoder self- and cross-attention) learn to transcribe from it. Each training
item is a clip and a chunk size (one of ``chunk_ms_list`` for multi-latency
training, so one model serves several latencies) with two losses:

- distillation on the whole utterance: the decoder, reading only the frames
  of the audio (as the streaming runtime does), fed the teacher's own greedy
  transcript, matches the bidirectional original's logits (KL over the
  teacher's top ``teacher_top_k`` tokens and one bin for the rest; no labels).
  The teacher's logits are computed once, before training, from the model
  itself, so no teacher copy is kept;
- where the clip has word end times (``builtin:speech`` does), prefix
  cross-entropy: cut at a random chunk boundary, the decoder reads the frames
  heard so far and learns the words that ended before it, then end of text.

The masked encoder runs only on the frames the clip's audio fills
(:func:`~streamify.runtime.speech_encoder.encode_heard`), as the runtime does,
not on Whisper's whole 30-second window. The adapters are merged into plain weights; the chunk spec goes into
``config.json`` (``streamify_chunk_causal``), the manifest and the card, and
:func:`streamify.load` gives the model back with the mask on.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from transformers.modeling_outputs import BaseModelOutput

from streamify.data.audio import read_clips
from streamify.data.speech import SPEECH
from streamify.distill.lora import add_lora, merge_lora
from streamify.distill.losses import kl_to_top_k, top_k_log_probs
from streamify.distill.trainer import TrainParams, train
from streamify.errors import UsageError
from streamify.io.cache import cache_root
from streamify.io.checkpoint import Checkpoint
from streamify.kinds.speech import decode_limit, decoder_prompt, greedy_decode
from streamify.model.fingerprint import content_key
from streamify.pipeline.registry import StageContext, register
from streamify.runtime.speech_encoder import CONFIG_KEY, FRAME_MS, ChunkSpec, enable_chunk_causal, encode_heard

ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]  # Whisper's encoder, decoder and cross attention


class CausalParams(TrainParams):
    """Params of ``convert.causal``: the chunking, the clips and the training (steps 0: the mask alone)."""

    chunk_ms: int = Field(300, ge=FRAME_MS, description="audio per encoder chunk, a multiple of 20 ms")
    chunk_ms_list: list[int] = Field(
        default_factory=list, description="multi-latency training: chunk sizes to sample from (ms; default: chunk_ms)"
    )
    first_chunk_extra_ms: int = Field(0, ge=0, description="extra audio in the first chunk (multiple of 20 ms)")
    clips: str = Field(
        SPEECH,
        description="training clips: builtin:speech (train split) or a folder of audio with .txt transcripts "
        "(and clipNNN.json word times for the prefix loss)",
    )
    max_clips: int = Field(256, ge=1, description="training clips read")
    kl_weight: float = Field(1.0, ge=0, description="weight of the distillation KL to the bidirectional original")
    temperature: float = Field(1.0, gt=0, description="distillation temperature")
    teacher_top_k: int = Field(
        64, ge=1, description="teacher tokens kept per position for the KL (the rest of the vocabulary is one bin)"
    )
    prefix_weight: float = Field(1.0, ge=0, description="weight of the prefix cross-entropy (clips with word times)")
    lora_rank: int = Field(16, ge=0, description="LoRA rank on the attention projections (0: train all weights)")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (CarelessWhisper: alpha = rank)")

    @field_validator("chunk_ms", "first_chunk_extra_ms")
    @classmethod
    def _whole_frames(cls, value: int) -> int:
        if value % FRAME_MS:
            raise ValueError(f"{value} ms is not a whole number of Whisper's {FRAME_MS} ms encoder frames")
        return value

    @model_validator(mode="after")
    def _list_of_frames(self) -> CausalParams:
        bad = [ms for ms in self.chunk_ms_list if ms % FRAME_MS or ms < FRAME_MS]
        if bad:
            raise ValueError(f"chunk_ms_list: {bad[0]} ms is not a whole number of {FRAME_MS} ms frames")
        return self

    def specs(self) -> list[ChunkSpec]:
        """The chunk specs training samples from; the first, ``chunk_ms``, is the artifact's default."""
        sizes = dict.fromkeys([self.chunk_ms, *self.chunk_ms_list])
        return [ChunkSpec.from_ms(ms, self.first_chunk_extra_ms) for ms in sizes]


class _Items:
    """Training items: features, teacher transcript ids, word times and the prefix cut of each (clip, spec)."""

    def __init__(self, checkpoint: Checkpoint, params: CausalParams, seed: int, progress) -> None:
        model, processor, tokenizer = checkpoint.model, checkpoint.processor, checkpoint.tokenizer
        clips = read_clips(params.clips, processor.sampling_rate, params.max_clips, split="train")
        self.specs = params.specs()
        self.prompt = decoder_prompt(model)
        features = processor([c.audio for c in clips], sampling_rate=processor.sampling_rate, return_tensors="pt")
        self.features = features.input_features.to(next(model.parameters()).device, model.dtype)
        per_frame = processor.sampling_rate * FRAME_MS // 1000
        limit = model.config.max_source_positions
        self.frames = [min(limit, -(-len(c.audio) // per_frame)) for c in clips]  # frames the audio fills
        self.words = [c.words for c in clips]
        self.texts = [c.text for c in clips]
        self.tokenizer = tokenizer
        eos = model.config.eos_token_id
        progress.log(f"convert.causal: the teacher transcribes {len(clips)} training clips (its own targets)")
        self.targets, self.teacher = [], []
        with torch.no_grad():  # not inference mode: the targets are the decoder's inputs in training
            for row in progress.track(range(len(clips)), "teacher transcripts", total=len(clips)):
                encoded = model.get_encoder()(input_features=self.features[row : row + 1])
                ids = greedy_decode(model, encoded, self.prompt, eos, decode_limit(model))
                target = torch.tensor([*self.prompt, *ids, eos], device=self.features.device)
                logits = _decoder_logits(model, encoded.last_hidden_state, target)
                self.targets.append(target)
                self.teacher.append(top_k_log_probs(logits, params.teacher_top_k, params.temperature))
        chooser = random.Random(seed)
        self.rows = [(clip, spec, chooser.random()) for clip in range(len(clips)) for spec in range(len(self.specs))]
        self.clips = len(clips)

    def prefix_labels(self, clip: int, cut_seconds: float, eos: int) -> torch.Tensor:
        """Prompt, the transcript's words that ended by ``cut_seconds``, end of text."""
        heard = ended_words(self.texts[clip], self.words[clip], cut_seconds)
        ids = self.tokenizer(" " + heard if heard else "", add_special_tokens=False)["input_ids"]
        return torch.tensor([*self.prompt, *ids, eos])


def ended_words(text: str, timed: list[list], cut_seconds: float) -> str:
    """The words of ``text`` spoken by ``cut_seconds``, given end times of some of them in order.

    A word without a time of its own (eSpeak joins short words such as "a" to
    the next) takes the end of the next timed word, so it counts as heard only
    once that word has ended too.
    """
    words = text.split()
    ends: list[float | None] = [None] * len(words)
    at = 0
    for spoken, end in timed:
        for index in range(at, len(words)):
            if spoken.lower() in words[index].lower():
                ends[index], at = end, index + 1
                break
    following = float("inf")
    for index in reversed(range(len(words))):
        following = ends[index] if ends[index] is not None else following
        ends[index] = following
    return " ".join(word for word, end in zip(words, ends, strict=True) if end <= cut_seconds)


def _decoder_logits(model, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The decoder's logits for ``labels`` (teacher forcing) over the encoder states ``encoded``."""
    out = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), decoder_input_ids=labels[None, :-1])
    return out.logits[0]


def _plan_check(params: CausalParams, model, where: str) -> dict:
    if getattr(model.config, "model_type", None) != "whisper":
        raise UsageError(
            f"{where}: convert.causal makes Whisper's encoder chunk-causal; this is a '{model.config.model_type}'",
            "use a Whisper checkpoint (a transformers folder or a CTranslate2 one)",
        )
    return {"chunk_ms": [spec.chunk_frames * FRAME_MS for spec in params.specs()]}


@register(
    "convert.causal",
    CausalParams,
    "chunk-causal Whisper encoder (block-causal mask) adapted by causal LoRA fine-tuning, for streaming ASR",
    relation="finetune",
    kinds=("speech-seq2seq",),
    check=_plan_check,
)
def convert_causal(checkpoint: Checkpoint, params: CausalParams, ctx: StageContext) -> Checkpoint:
    """Mask the encoder chunk-causally; with ``steps`` > 0, train LoRA adapters to transcribe under the mask."""
    model = checkpoint.model
    _plan_check(params, model, checkpoint.source.spec)
    for layer in model.get_encoder().layers:  # a chunk-causal source starts again from its bidirectional form
        layer.self_attn.streamify_chunks = None
    specs = params.specs()
    metrics: dict = {"chunk_ms": [s.chunk_frames * FRAME_MS for s in specs]}
    if params.steps:
        model, trained = _train(checkpoint, params, ctx)
        metrics.update(trained)
    enable_chunk_causal(model, specs[0])
    setattr(model.config, CONFIG_KEY, {**specs[0].to_json(), "trained_chunk_ms": metrics["chunk_ms"]})
    checkpoint.model = model
    ctx.metrics.update(metrics)
    return checkpoint


def _train(checkpoint: Checkpoint, params: CausalParams, ctx: StageContext):
    """LoRA (or all weights) trained under the mask to match the bidirectional model's logits, computed first."""
    model = checkpoint.model
    items = _Items(checkpoint, params, ctx.seed, ctx.progress)  # the teacher's logits, before any change
    layers = model.get_encoder().layers
    trainee = add_lora(model, params.lora_rank, params.lora_alpha, ATTENTION)
    enable_chunk_causal(model, items.specs[0])
    eos = model.config.eos_token_id

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=items.features.device)
        for row in batch[:, 0].tolist():
            clip, spec_index, draw = items.rows[row]
            spec = items.specs[spec_index]
            for layer in layers:
                layer.self_attn.streamify_chunks = spec
            heard = items.frames[clip]
            encoded = encode_heard(trainee, items.features[clip : clip + 1], heard)  # the frames the audio fills
            logits = _decoder_logits(trainee, encoded, items.targets[clip])
            loss = params.kl_weight * kl_to_top_k(logits, *items.teacher[clip], params.temperature)
            if params.prefix_weight and items.words[clip]:
                bounds = [stop for _, stop in spec.bounds(heard)]
                cut = bounds[min(len(bounds) - 1, int(draw * len(bounds)))]
                prefix = items.prefix_labels(clip, cut * FRAME_MS / 1000, eos).to(encoded.device)
                prefix_logits = _decoder_logits(trainee, encoded[:, :cut], prefix)
                loss = loss + params.prefix_weight * F.cross_entropy(prefix_logits.float(), prefix[1:])
            total = total + loss
        return total / batch.shape[0]

    rows = torch.arange(len(items.rows))[:, None]  # one row per (clip, chunk size): the trainer's "blocks"
    settings = {"params": params.model_dump(), "seed": ctx.seed}
    checkpoint_dir = cache_root() / "train" / content_key(model, settings) if ctx.use_cache else None
    result = train(trainee, rows, loss_fn, params, seed=ctx.seed, checkpoint_dir=checkpoint_dir, progress=ctx.progress)
    merged = merge_lora(trainee)
    return merged, {
        "train_steps": result.steps,
        "train_clips": items.clips,
        "train_items": len(items.rows),
        "train_with_word_times": sum(words is not None for words in items.words),
        "train_resumed_from_step": result.resumed_from,
        "train_loss_first": result.losses[0] if result.losses else None,
        "train_loss_last": result.losses[-1] if result.losses else None,
    }

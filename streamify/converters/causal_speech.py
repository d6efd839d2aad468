"""Causal LoRA for Whisper (CarelessWhisper), the speech half of ``convert.causal``.

The encoder gets the block-causal mask of :mod:`streamify.runtime.chunk_causal`;
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
not on Whisper's whole 30-second window.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from streamify.data.audio import read_clips
from streamify.distill.lora import add_lora, train_and_merge
from streamify.distill.losses import kl_to_top_k, top_k_log_probs
from streamify.io.checkpoint import Checkpoint
from streamify.kinds.speech import decode_limit, decoder_prompt, greedy_decode
from streamify.pipeline.registry import StageContext
from streamify.runtime.chunk_causal import ChunkSpec, enable_chunk_causal, set_chunks
from streamify.runtime.speech_encoder import FRAME_MS, encode_heard

if TYPE_CHECKING:
    from streamify.converters.causal_params import CausalParams


class _Items:
    """Training items: each clip's mel as the runtime computes it at the end of the stream, the teacher's
    transcript and top-k log-probabilities, word times, and the prefix cut of each (clip, spec)."""

    def __init__(
        self, checkpoint: Checkpoint, params: CausalParams, specs: list[ChunkSpec], seed: int, progress
    ) -> None:
        model, processor, tokenizer = checkpoint.model, checkpoint.processor, checkpoint.tokenizer
        clips = read_clips(params.clips, processor.sampling_rate, params.max_clips, split="train")
        self.specs = specs
        self.prompt = decoder_prompt(model)
        self.device = next(model.parameters()).device
        rate, limit = processor.sampling_rate, model.config.max_source_positions
        self.heard = [  # the mel of the audio alone (not padded to 30 s), as the streaming runtime has it
            processor(c.audio, sampling_rate=rate, padding="longest", return_tensors="pt").input_features.to(
                self.device, model.dtype
            )
            for c in clips
        ]
        self.frames = [min(limit, (mel.shape[-1] + 1) // 2) for mel in self.heard]  # the runtime's last frame
        self.words = [c.words for c in clips]
        self.texts = [c.text for c in clips]
        self.tokenizer = tokenizer
        eos = model.config.eos_token_id
        progress.log(f"convert.causal: the teacher transcribes {len(clips)} training clips (its own targets)")
        self.targets, self.teacher = [], []
        with torch.no_grad():  # not inference mode: the targets are the decoder's inputs in training
            for clip in progress.track(clips, "teacher transcripts", total=len(clips)):
                whole = processor(clip.audio, sampling_rate=rate, return_tensors="pt").input_features  # 30 s
                encoded = model.get_encoder()(input_features=whole.to(self.device, model.dtype))
                ids = greedy_decode(model, encoded, self.prompt, eos, decode_limit(model))
                target = torch.tensor([*self.prompt, *ids, eos], device=self.device)
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


def train_speech(
    checkpoint: Checkpoint,
    params: CausalParams,
    specs: list[ChunkSpec],
    projections: tuple[str, ...],
    ctx: StageContext,
):
    """LoRA (or all weights) trained under the mask to match the bidirectional model's logits, computed first;
    returns the merged model and the training metrics."""
    model = checkpoint.model
    items = _Items(checkpoint, params, specs, ctx.seed, ctx.progress)  # the teacher's logits, before any change
    trainee = add_lora(model, params.lora_rank, params.lora_alpha, list(projections))
    enable_chunk_causal(model, specs[0])
    eos = model.config.eos_token_id

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=items.device)
        for row in batch[:, 0].tolist():
            clip, spec_index, draw = items.rows[row]
            spec = items.specs[spec_index]
            set_chunks(model, spec)
            heard = items.frames[clip]
            encoded = encode_heard(trainee, items.heard[clip], heard)  # the frames the runtime has at the end
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
    merged, metrics = train_and_merge(model, trainee, rows, loss_fn, params, ctx)
    return merged, {
        **metrics,
        "train_clips": items.clips,
        "train_items": len(items.rows),
        "train_with_word_times": sum(words is not None for words in items.words),
    }

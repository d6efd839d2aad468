"""Speech sequence-to-sequence models (Whisper): audio in, transcript tokens out; judged by WER.

Decoding is greedy, from the decoder prompt the model's generation config
declares (start of transcript, English, transcribe, no timestamps, where it
has those tokens). WER is computed by ``jiwer`` on text lower-cased with
punctuation removed (``wer_normalization`` in the report says so).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from streamify.data.speech import SPEECH
from streamify.errors import InputError, UsageError
from streamify.kinds import Kind, in_mapping

_PUNCTUATION = re.compile(r"[^\w\s']")


class SpeechSeq2Seq(Kind):
    name = "speech-seq2seq"
    summary = "speech encoder-decoder: audio -> transcript; WER, KL on decoder logits"
    default_data = SPEECH
    order = 10

    def matches(self, model: Any) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING

        return in_mapping(MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING, model)

    def eval_data(self, checkpoint: Any, spec: Any) -> Any:
        from streamify.data.audio import read_clips

        where = checkpoint.source.spec
        if checkpoint.processor is None or checkpoint.tokenizer is None:
            raise UsageError(
                f"{where}: speech eval needs the model's feature extractor and tokenizer "
                "(preprocessor_config.json and tokenizer files)",
                "use a checkpoint folder that ships them",
            )
        rate = checkpoint.processor.sampling_rate
        clips = read_clips(spec.data or SPEECH, rate, spec.max_items)
        features = checkpoint.processor([c.audio for c in clips], sampling_rate=rate, return_tensors="pt")
        prompt = decoder_prompt(checkpoint.model)
        eos = checkpoint.model.config.eos_token_id
        labels = []
        for clip in clips:
            ids = [*prompt, *checkpoint.tokenizer(clip.text, add_special_tokens=False)["input_ids"], eos]
            if len(ids) - 1 > checkpoint.model.config.max_target_positions:
                raise InputError(
                    f"{clip.path.with_suffix('.txt')}: the transcript is {len(ids)} tokens with the prompt; "
                    f"the decoder holds {checkpoint.model.config.max_target_positions}",
                    "split the clip and its transcript into shorter ones",
                )
            labels.append(torch.tensor(ids))
        resampled = sorted({c.resampled_from for c in clips if c.resampled_from})
        return {
            "features": features.input_features,
            "texts": [c.text for c in clips],
            "labels": labels,
            "resampled_from_hz": resampled,
        }

    @torch.inference_mode()
    def score(self, checkpoint: Any, data: Any, spec: Any, progress: Any) -> tuple[dict, Any]:
        import jiwer

        model, tokenizer = checkpoint.model, checkpoint.tokenizer
        device = next(model.parameters()).device
        prompt = decoder_prompt(model)
        hypotheses, nll, tokens = [], 0.0, 0
        rows = list(zip(data["features"], data["labels"], strict=True))
        for features, labels in progress.track(rows, "transcribing", total=len(rows)):
            features = features[None].to(device, model.dtype)
            encoded = model.get_encoder()(input_features=features)
            logits = model(encoder_outputs=encoded, decoder_input_ids=labels[None, :-1].to(device)).logits[0]
            scored = slice(len(prompt) - 1, None)  # the prompt is given, not predicted
            nll += F.cross_entropy(logits[scored].float(), labels[1:][scored].to(device), reduction="sum").item()
            tokens += len(labels) - len(prompt)
            limit = min(spec.max_new_tokens or decode_limit(model), decode_limit(model))
            ids = greedy_decode(model, encoded, prompt, model.config.eos_token_id, limit)
            hypotheses.append(tokenizer.decode(ids, skip_special_tokens=True))
        references = [normalize(t) for t in data["texts"]]
        guesses = [normalize(h) for h in hypotheses]
        metrics = {
            "wer": jiwer.wer(references, guesses),
            "nll": nll / tokens,
            "clips": len(rows),
            "words": sum(len(r.split()) for r in references),
            "wer_normalization": "lower case, punctuation removed",
            **({"resampled_from_hz": data["resampled_from_hz"]} if data["resampled_from_hz"] else {}),
            "transcripts": hypotheses[:3],
        }
        return metrics, None


def normalize(text: str) -> str:
    """Lower case, punctuation removed, spaces collapsed (what WER is computed on)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def decoder_prompt(model: Any) -> list[int]:
    """A transcript's first tokens: start of transcript, then English, transcribe, no timestamps (if declared)."""
    config = getattr(model, "generation_config", None)
    prompt = [model.config.decoder_start_token_id]
    languages = getattr(config, "lang_to_id", None) or {}
    tasks = getattr(config, "task_to_id", None) or {}
    if "<|en|>" in languages:
        prompt.append(languages["<|en|>"])
    if "transcribe" in tasks:
        prompt.append(tasks["transcribe"])
    no_timestamps = getattr(config, "no_timestamps_token_id", None)
    if no_timestamps is not None:
        prompt.append(no_timestamps)
    return prompt


def decode_limit(model: Any) -> int:
    """The most tokens a transcript may have: the decoder's positions after the prompt."""
    return model.config.max_target_positions - len(decoder_prompt(model))


@torch.inference_mode()
def greedy_decode(
    model: Any, encoded: Any, prompt: list[int], eos: int, limit: int, probabilities: list[float] | None = None
) -> list[int]:
    """Greedy decoding with the decoder's KV cache; the new tokens (without the prompt or end of text).

    With ``probabilities``, each new token's probability is appended to it."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    out = model(encoder_outputs=encoded, decoder_input_ids=ids, use_cache=True)
    new: list[int] = []
    for _ in range(limit):
        token = int(out.logits[0, -1].argmax())
        if token == eos:
            break
        new.append(token)
        if probabilities is not None:
            probabilities.append(float(out.logits[0, -1].float().softmax(-1)[token]))
        step = torch.tensor([[token]], device=device)
        cache = out.past_key_values
        out = model(encoder_outputs=encoded, decoder_input_ids=step, past_key_values=cache, use_cache=True)
    return new


KINDS = (SpeechSeq2Seq(),)

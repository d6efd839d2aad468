"""Causal language models: token windows in, next-token logits out; judged by perplexity."""

from __future__ import annotations

from typing import Any

from streamify.errors import UsageError
from streamify.kinds import Kind, in_mapping

CAUSAL_LM = "causal-lm"
DEFAULT_TEXT = "builtin:pydoc"


class TextKind(Kind):
    """A kind evaluated on held-out text cut into token windows (causal LMs, encoders)."""

    default_data = DEFAULT_TEXT
    reads_text = True

    def check_eval(self, model: Any, spec: Any, where: str) -> None:
        check_window(model, spec.seq_len, where)

    def eval_data(self, checkpoint: Any, spec: Any) -> Any:
        return text_windows(checkpoint, spec)


class CausalLM(TextKind):
    name = CAUSAL_LM
    summary = "decoder LM: token ids -> next-token logits; perplexity, KL on logits"
    order = 20

    def matches(self, model: Any) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        return in_mapping(MODEL_FOR_CAUSAL_LM_MAPPING, model)

    def score(self, checkpoint: Any, data: Any, spec: Any, progress: Any) -> tuple[dict, Any]:
        from streamify.eval.perplexity import perplexity

        metrics = perplexity(checkpoint.model, data, spec.batch_size, progress)
        return {**metrics, "seq_len": int(data.shape[1])}, None


def check_window(model: Any, seq_len: int, where: str) -> None:
    """Refuse eval windows longer than the positions the model's config declares."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and seq_len > limit:
        raise UsageError(
            f"{where}: eval windows of {seq_len} tokens exceed the model's {limit} positions (config.json)",
            f"pass --seq-len {limit} or less to streamify eval, eval.seq_len={limit} after a recipe, or --no-eval",
        )


def text_windows(checkpoint: Any, spec: Any) -> Any:
    """The held-out token windows of ``spec`` for a text model (:func:`~streamify.data.blocks.token_blocks`)."""
    from streamify.data.blocks import token_blocks
    from streamify.data.sources import load_texts

    check_window(checkpoint.model, spec.seq_len, checkpoint.source.spec)
    data = spec.text_data()
    texts = load_texts(data, "heldout")
    return token_blocks(checkpoint.tokenizer, texts, spec.seq_len, spec.max_tokens, where=f"--data {data}")


KINDS = (CausalLM(),)

"""The params of ``convert.causal`` (:mod:`streamify.converters.causal`): chunking, data and training."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from streamify.data.speech import SPEECH
from streamify.distill.trainer import TrainParams
from streamify.runtime.chunk_causal import ChunkSpec
from streamify.runtime.speech_encoder import FRAME_MS, whisper_chunks

SPEECH_ONLY = (
    "chunk_ms",
    "chunk_ms_list",
    "first_chunk_extra_ms",
    "clips",
    "max_clips",
    "kl_weight",
    "temperature",
    "teacher_top_k",
    "prefix_weight",
)
TEXT_ONLY = ("chunk_tokens", "seq_len")


class CausalParams(TrainParams):
    """Params of ``convert.causal``: the chunking, the data and the training (steps 0: the mask alone)."""

    chunk_ms: int = Field(300, ge=FRAME_MS, description="speech: audio per encoder chunk, a multiple of 20 ms")
    chunk_ms_list: list[int] = Field(
        default_factory=list,
        description="speech: multi-latency training, chunk sizes to sample from (ms; default: chunk_ms)",
    )
    first_chunk_extra_ms: int = Field(0, ge=0, description="speech: extra audio in the first chunk (multiple of 20 ms)")
    left_chunks: int = Field(
        0,
        ge=0,
        description="chunks of left context a position sees (0: all before it), counted in chunks of the "
        "size in use (each size of chunk_ms_list, or the one streamed)",
    )
    chunk_tokens: int = Field(16, ge=1, description="text encoders: tokens per chunk")
    seq_len: int = Field(128, ge=2, description="text encoders: training sequence length (tokens of --data)")
    clips: str = Field(
        SPEECH,
        description="speech: training clips, builtin:speech (train split), a folder of audio with .txt transcripts "
        "(and clipNNN.json word times for the prefix loss) or a .jsonl manifest",
    )
    max_clips: int = Field(256, ge=1, description="speech: training clips read")
    kl_weight: float = Field(1.0, ge=0, description="speech: weight of the KL to the bidirectional original")
    temperature: float = Field(1.0, gt=0, description="speech: distillation temperature")
    teacher_top_k: int = Field(
        64, ge=1, description="speech: teacher tokens kept per position for the KL (the rest is one bin)"
    )
    prefix_weight: float = Field(1.0, ge=0, description="speech: weight of the prefix cross-entropy (word times)")
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

    def specs(self, speech: bool) -> list[ChunkSpec]:
        """The chunk specs training samples from; the first is the artifact's default."""
        if not speech:
            return [ChunkSpec(self.chunk_tokens, left_chunks=self.left_chunks)]
        sizes = dict.fromkeys([self.chunk_ms, *self.chunk_ms_list])
        return [whisper_chunks(ms, self.first_chunk_extra_ms, self.left_chunks) for ms in sizes]

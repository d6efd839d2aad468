"""Speech clips with transcripts: a folder of audio files with same-name transcripts, a JSON-lines manifest, or a
Hugging Face audio data set (``hf:NAME[:CONFIG[:SPLIT]]``)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamify.data.speech import SPEECH, speech_folder
from streamify.errors import InputError, UsageError

AUDIO_SUFFIXES = (".wav", ".flac")
AUDIO_LAYOUT = (
    "a folder of .wav or .flac files, each with its transcript in a .txt file of the same name (and word end "
    "times in a same-name .json), a .jsonl manifest with audio, text (and words) per line, "
    "hf:NAME[:CONFIG[:SPLIT]] (an audio column and a text column), or builtin:speech"
)
TEXT_COLUMNS = ("text", "sentence", "transcription", "normalized_text")  # what audio data sets call the transcript


@dataclass(frozen=True)
class Clip:
    """One mono clip (float32 samples in [-1, 1]) at ``rate`` Hz and what is said in it."""

    path: Path
    audio: np.ndarray
    rate: int
    text: str
    resampled_from: int | None = None  # the file's own rate when it was resampled to ``rate``
    words: list | None = None  # [[word, end seconds], ...] when known (for the prefix loss of convert.causal)


def read_clips(data: str | None, rate: int, limit: int | None = None, split: str = "heldout") -> list[Clip]:
    """The clips of ``data`` (a folder, a ``.jsonl`` manifest, or ``builtin:speech``'s ``split``; at most
    ``limit``), mono, at ``rate`` Hz (resampled with soxr where a file has another rate: ``Clip.resampled_from``).

    A folder's clips are sorted by name, each ``.wav``/``.flac`` with a same-name ``.txt`` transcript and,
    optionally, a ``.json`` holding ``{"words": [[word, end_seconds], ...]}``. A manifest's lines are
    ``{"audio": PATH, "text": ..., "words": [...]}`` (``words`` optional; paths relative to the manifest).
    """
    if not data:
        raise UsageError("speech eval needs audio: no --data given", f"pass --data FOLDER: {AUDIO_LAYOUT}")
    if data == SPEECH:
        data = str(speech_folder(split))
    if data.startswith("hf:"):
        return _hub_clips(data, rate, limit)
    source = Path(data).expanduser()
    if source.is_file() and source.suffix == ".jsonl":
        entries = _manifest(source)
    elif source.is_dir():
        entries = _folder(source)
    else:
        raise UsageError(f"--data {data}: not a folder or a .jsonl manifest", f"speech data is {AUDIO_LAYOUT}")
    if not entries:
        raise UsageError(f"--data {data}: holds no clips", f"speech data is {AUDIO_LAYOUT}")
    clips = []
    for path, text, words in entries[:limit]:
        audio, found = _mono_at(path, rate)
        clips.append(Clip(path, audio, rate, text, found if found != rate else None, words))
    return clips


def _folder(folder: Path) -> list[tuple[Path, str, list | None]]:
    """``(audio path, transcript, word times or None)`` of a folder's clips, sorted by name."""
    entries = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
        transcript = path.with_suffix(".txt")
        if not transcript.is_file():
            raise InputError(f"{path}: no transcript ({transcript.name} is missing)", f"speech data is {AUDIO_LAYOUT}")
        record = path.with_suffix(".json")
        words = _json(record).get("words") if record.is_file() else None
        entries.append((path, transcript.read_text().strip(), words))
    return entries


def _manifest(path: Path) -> list[tuple[Path, str, list | None]]:
    """``(audio path, transcript, word times or None)`` per line of a JSON-lines manifest."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            audio, text = path.parent / item["audio"], str(item["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{path}:{number}: not a manifest line ({exc})",
                'write one JSON object a line: {"audio": "clip.wav", "text": "what is said", "words": [...]}',
            ) from exc
        if not audio.is_file():
            raise InputError(f"{path}:{number}: {audio} does not exist", "paths are relative to the manifest")
        entries.append((audio, text.strip(), item.get("words")))
    return entries


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})", "rewrite it, or remove it") from exc


def _hub_clips(spec: str, rate: int, limit: int | None) -> list[Clip]:
    """The first ``limit`` clips of a Hugging Face audio data set, streamed (nothing else is downloaded); the
    audio column's encoded bytes are decoded with soundfile, the transcript read from a known text column."""
    import datasets

    from streamify.data.sources import hf_parts
    from streamify.io.source import hub_offline

    name, config, split = hf_parts(spec)
    if hub_offline() and not Path(name).expanduser().exists():
        raise InputError(f"--data {spec}: HF_HUB_OFFLINE is set, so the hub data set cannot be fetched", AUDIO_LAYOUT)
    failed = f"--data {spec}: could not load the data set"
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as exc:  # network, missing config or split: all reported the same way
        raise InputError(f"{failed} ({exc})", "check the name, config and split") from exc
    columns = list(rows.features or {}) or list(rows.column_names or [])
    text = next((c for c in TEXT_COLUMNS if c in columns), None)
    if "audio" not in columns or text is None:
        raise InputError(
            f"--data {spec}: needs an 'audio' column and a transcript column (columns: {', '.join(columns)})",
            f"use a data set with 'audio' and one of {', '.join(TEXT_COLUMNS)}",
        )
    rows = rows.cast_column("audio", datasets.Audio(decode=False))  # bytes: decoded here, without torchcodec
    try:
        items = [(row["audio"], row[text]) for _, row in zip(range(limit or 10**9), rows, strict=False)]
    except Exception as exc:  # the stream broke while reading
        raise InputError(f"{failed} ({exc})", "check the connection and the data set's files") from exc
    if not items:
        raise InputError(f"--data {spec}: the split holds no clips", "check the split (hf:NAME:CONFIG:SPLIT)")
    clips = []
    for number, (audio, transcript) in enumerate(items):
        where = Path(f"{spec}#{number}")
        if not isinstance(audio, dict) or not (audio.get("bytes") or audio.get("path")):
            raise InputError(f"{where}: the audio column holds neither bytes nor a path", "check the data set")
        samples, found = _mono_at(io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"], rate, where)
        clips.append(Clip(where, samples, rate, str(transcript).strip(), found if found != rate else None))
    return clips


def _mono_at(path, rate: int, where: Path | None = None) -> tuple[np.ndarray, int]:
    """``(mono float32 samples at rate Hz, the file's own rate)`` of a file (or file-like object, named
    ``where``); a clear error for what is not audio."""
    import soundfile

    path_name = where or path
    try:
        audio, found = soundfile.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise InputError(f"{path_name}: not audio soundfile can read ({exc})", "give a .wav or .flac file") from exc
    if not len(audio):
        raise InputError(f"{path_name}: the file holds no samples", "give a clip with sound in it")
    mono = audio.mean(axis=1)
    if found == rate:
        return mono, found
    import soxr

    return soxr.resample(mono, found, rate).astype(np.float32), found


def read_audio(path: str, rate: int) -> tuple[np.ndarray, str | None]:
    """A mono float32 clip at ``rate`` Hz from an audio file (resampled with soxr if needed) and a note saying so."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"{path}: no such file", "give a .wav or .flac file, or - for raw audio on standard input")
    audio, found = _mono_at(file, rate)
    return audio, (f"{path}: resampled from {found} Hz to {rate} Hz" if found != rate else None)


def stdin_pieces(stream, samples: int, first: int) -> Iterator[np.ndarray]:
    """Raw 16-bit little-endian mono PCM read from ``stream`` (binary) as it arrives: ``first`` samples, then
    ``samples`` at a time (the last piece may be shorter)."""
    size = first
    while True:
        data = stream.read(2 * size)
        if not data:
            return
        yield np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768
        size = samples

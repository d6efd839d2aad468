"""Speech clips with transcripts: a folder of audio files with same-name transcripts, or a JSON-lines manifest."""

from __future__ import annotations

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
    "times in a same-name .json), a .jsonl manifest with audio, text (and words) per line, or builtin:speech"
)


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


def _mono_at(path: Path, rate: int) -> tuple[np.ndarray, int]:
    """``(mono float32 samples at rate Hz, the file's own rate)``; a clear error for what is not audio."""
    import soundfile

    try:
        audio, found = soundfile.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise InputError(f"{path}: not audio soundfile can read ({exc})", "give a .wav or .flac file") from exc
    if not len(audio):
        raise InputError(f"{path}: the file holds no samples", "give a clip with sound in it")
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

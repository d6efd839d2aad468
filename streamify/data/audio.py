"""Speech clips with transcripts: a folder of ``.wav``/``.flac`` files, each with a same-name ``.txt``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamify.data.speech import SPEECH, speech_folder
from streamify.errors import InputError, UsageError

AUDIO_SUFFIXES = (".wav", ".flac")
AUDIO_LAYOUT = (
    "a folder of .wav or .flac files, each with its transcript in a .txt file of the same name, or builtin:speech"
)


@dataclass(frozen=True)
class Clip:
    """One mono clip (float32 samples in [-1, 1]) at ``rate`` Hz and what is said in it."""

    path: Path
    audio: np.ndarray
    rate: int
    text: str
    resampled_from: int | None = None  # the file's own rate when it was resampled to ``rate``


def read_clips(data: str | None, rate: int, limit: int | None = None, split: str = "heldout") -> list[Clip]:
    """The clips of the folder ``data`` or of ``builtin:speech``'s ``split`` (sorted by name, at most ``limit``),
    mono, at ``rate`` Hz (resampled with soxr where a file has another rate: ``Clip.resampled_from``)."""
    if not data:
        raise UsageError("speech eval needs audio: no --data given", f"pass --data FOLDER: {AUDIO_LAYOUT}")
    if data == SPEECH:
        data = str(speech_folder(split))
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--data {data}: not a folder", f"speech data is {AUDIO_LAYOUT}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not paths:
        raise UsageError(f"--data {data}: holds no .wav or .flac files", f"speech data is {AUDIO_LAYOUT}")
    clips = []
    for path in paths[:limit]:
        transcript = path.with_suffix(".txt")
        if not transcript.is_file():
            raise InputError(f"{path}: no transcript ({transcript.name} is missing)", f"speech data is {AUDIO_LAYOUT}")
        audio, found = _mono_at(path, rate)
        clips.append(Clip(path, audio, rate, transcript.read_text().strip(), found if found != rate else None))
    return clips


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

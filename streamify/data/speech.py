"""``builtin:speech``: English sentences spoken by eSpeak NG, with transcripts and each word's end time.

Sentences come from ``builtin:pydoc``'s prose (its train or held-out split:
the two never share a text), keeping those of 5 to 20 plain words. eSpeak NG
(the library and voice data of the ``espeakng-loader`` wheel, through its C API)
speaks each one with one of a few voices, rates and pitches, reporting where
each word starts as it synthesises; a word ends where the next one starts (the
last where the audio ends). The word list is eSpeak's: it may join a short
word to its neighbour, so it can hold fewer words than the transcript. Audio is resampled from eSpeak's 22,050 Hz to
16 kHz with ``soxr``. The set is made once per split into streamify's cache:
``clipNNN.wav`` (16-bit PCM), ``clipNNN.txt`` (the transcript) and
``clipNNN.json`` (``{"words": [[word, end_seconds], ...], "voice": ...}``).
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
from pathlib import Path

import numpy as np

from streamify.errors import InputError
from streamify.io.atomic import publish, temp_sibling
from streamify.io.cache import cache_root

SPEECH = "builtin:speech"
RATE = 16000
VERSION = 2
CLIPS = {"train": 256, "heldout": 64}
# (voice, words per minute, pitch 0-100): what varies from clip to clip
VOICES = (("en-us", 175, 50), ("en", 150, 40), ("en-us", 210, 65), ("en-gb-x-rp", 165, 55))
_PLAIN = re.compile(r"^[A-Za-z][a-z'-]*(,? [A-Za-z][a-z'-]*)*$")  # words without inner capitals (no CamelCase)
_WORD_EVENT, _END_EVENT, _LIST_END = 1, 5, 0
_SYNCHRONOUS, _UTF8, _POS_CHARACTER = 2, 1, 1
_RATE_PARAMETER, _PITCH_PARAMETER = 1, 3


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class Espeak:
    """eSpeak NG in synchronous mode: text in, int16 samples and word start times out."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise InputError(
                f"{SPEECH} needs eSpeak NG, which is not installed ({exc})", "pip install espeakng-loader"
            ) from exc
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, data, 0)
        if self.rate <= 0:
            raise InputError(f"eSpeak NG did not start (data under {data.decode()})", "reinstall espeakng-loader")
        self._samples: list[np.ndarray] = []
        self._starts: list[tuple[int, int, int]] = []  # (text position, length, ms)
        self._callback = _CALLBACK(self._collect)  # kept alive as long as the library may call it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, count, events) -> int:
        if count > 0:
            self._samples.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        index = 0
        while events[index].type != _LIST_END:
            event = events[index]
            if event.type == _WORD_EVENT:
                self._starts.append((event.text_position, event.length, event.audio_position))
            index += 1
        return 0

    def speak(self, text: str, voice: str, words_per_minute: int, pitch: int) -> tuple[np.ndarray, list]:
        """``(int16 samples at self.rate, [(text position, length, start ms)] per word)``."""
        self._samples, self._starts = [], []
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise InputError(f"eSpeak NG has no voice {voice!r}", "reinstall espeakng-loader")
        self.lib.espeak_SetParameter(_RATE_PARAMETER, words_per_minute, 0)
        self.lib.espeak_SetParameter(_PITCH_PARAMETER, pitch, 0)
        raw = text.encode() + b"\0"
        self.lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, _UTF8, None, None)
        self.lib.espeak_Synchronize()
        audio = np.concatenate(self._samples) if self._samples else np.zeros(0, dtype=np.int16)
        return audio, list(self._starts)


def sentences(split: str, count: int) -> list[str]:
    """Up to ``count`` plain sentences (5-20 words, letters and light punctuation) of builtin:pydoc's ``split``."""
    from streamify.data.pydoc import pydoc_texts

    found: list[str] = []
    seen: set[str] = set()
    for text in pydoc_texts(split):
        for candidate in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            sentence = candidate.rstrip(".!?")
            if _PLAIN.match(sentence) and 5 <= len(sentence.split()) <= 20 and sentence not in seen:
                seen.add(sentence)
                found.append(sentence + ".")
                if len(found) == count:
                    return found
    return found


def _word_ends(text: str, starts: list, seconds: float) -> list[list]:
    """``[[word, end seconds]]``: a word ends where the next begins, the last at the end of the audio."""
    words = [(text[position - 1 : position - 1 + length], ms / 1000) for position, length, ms in starts]
    ends = [start for _, start in words[1:]] + [seconds]
    return [[word.strip(" ,.'"), round(end, 3)] for (word, _), end in zip(words, ends, strict=True)]


def speech_folder(split: str) -> Path:
    """The cached folder of ``builtin:speech``'s ``split`` (``train`` or ``heldout``), made on first use."""
    import soundfile
    import soxr

    folder = cache_root() / "speech" / f"{split}.v{VERSION}"
    if folder.is_dir():
        return folder
    engine = Espeak()
    tmp = temp_sibling(folder)
    try:
        texts = sentences(split, CLIPS[split])
        if not texts:
            raise InputError(
                f"{SPEECH}: builtin:pydoc's {split} split holds no plain sentence to speak",
                "use a folder of clips with transcripts as --data",
            )
        for index, text in enumerate(texts):
            voice, words_per_minute, pitch = VOICES[index % len(VOICES)]
            samples, starts = engine.speak(text, voice, words_per_minute, pitch)
            audio = soxr.resample(samples.astype(np.float32) / 32768, engine.rate, RATE)
            stem = tmp / f"clip{index:03d}"
            soundfile.write(stem.with_suffix(".wav"), audio, RATE, subtype="PCM_16")
            stem.with_suffix(".txt").write_text(text)
            record = {"words": _word_ends(text, starts, len(audio) / RATE), "voice": [voice, words_per_minute, pitch]}
            stem.with_suffix(".json").write_text(json.dumps(record))
        publish(tmp, folder, complete=lambda f: any(f.glob("*.wav")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder

"""builtin:speech: eSpeak NG sentences with transcripts and word end times, made once into the cache."""

from __future__ import annotations

import json

import numpy as np
import soundfile

from streamify.data.audio import read_clips
from streamify.data.speech import CLIPS, RATE, sentences, speech_folder


def test_builtin_speech_clips_hold_their_sentences_and_word_times():
    folder = speech_folder("heldout")
    clips = read_clips("builtin:speech", RATE)
    assert len(clips) == CLIPS["heldout"] == len(list(folder.glob("*.wav")))
    assert [c.text for c in clips] == sentences("heldout", CLIPS["heldout"])
    voices = set()
    for clip in clips[:16]:
        audio, rate = soundfile.read(clip.path)
        assert rate == RATE and audio.ndim == 1 and np.abs(audio).max() > 0.05  # spoken, not silence
        record = json.loads(clip.path.with_suffix(".json").read_text())
        ends = [end for _, end in record["words"]]
        assert ends == sorted(ends) and 0 < ends[-1] <= len(audio) / RATE + 1e-3
        spoken = [word.lower() for word, _ in record["words"]]
        assert all(word in clip.text.lower() for word in spoken)  # eSpeak's words are pieces of the transcript
        assert len(spoken) >= 0.6 * len(clip.text.split())
        voices.add(tuple(record["voice"]))
    assert len(voices) > 1
    assert speech_folder("heldout") == folder  # made once


def test_train_and_heldout_share_no_sentence():
    assert not set(sentences("train", CLIPS["train"])) & set(sentences("heldout", CLIPS["heldout"]))

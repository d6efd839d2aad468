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


def test_a_jsonl_manifest_reads_like_the_folder(tmp_path):
    """The same clips listed in a manifest (paths relative to it, word times inline) read as the folder does."""
    folder = speech_folder("heldout")
    listed = []
    for wav in sorted(folder.glob("*.wav"))[:3]:
        record = json.loads(wav.with_suffix(".json").read_text())
        text = wav.with_suffix(".txt").read_text()
        listed.append({"audio": str(wav.relative_to(folder.parent)), "text": text, "words": record["words"]})
    manifest = folder.parent / f"{tmp_path.name}.jsonl"  # beside the clip folder: relative paths resolve
    manifest.write_text("\n".join(json.dumps(item) for item in listed) + "\n")
    try:
        from_manifest = read_clips(str(manifest), RATE)
        from_folder = read_clips(str(folder), RATE, 3)
    finally:
        manifest.unlink()
    assert [c.text for c in from_manifest] == [c.text for c in from_folder]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(from_manifest, from_folder, strict=True))
    assert [c.words for c in from_manifest] == [c.words for c in from_folder] and from_folder[0].words


def test_bad_manifests_are_clear_errors(tmp_path, cli, tiny_kinds):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "missing.wav", "text": "hello"}\n')
    result = cli("eval", tiny_kinds["speech-seq2seq"], "--data", manifest)
    assert result.exit_code == 3 and "m.jsonl:1" in result.stderr and "missing.wav does not exist" in result.stderr
    manifest.write_text('{"text": "no audio"}\n')
    result = cli("eval", tiny_kinds["speech-seq2seq"], "--data", manifest)
    assert result.exit_code == 3 and "m.jsonl:1: not a manifest line" in result.stderr

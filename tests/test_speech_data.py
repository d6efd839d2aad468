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


def _audio_parquet(folder, clips, text_column="sentence"):
    """A data set folder as the hub stores one: parquet, an Audio feature declared in the schema metadata, the
    audio as encoded bytes (FLAC at the clips' own rate)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    encoded = []
    for clip in clips:
        buffer = io.BytesIO()
        soundfile.write(buffer, clip.audio, clip.rate, format="FLAC")
        encoded.append({"bytes": buffer.getvalue(), "path": clip.path.name})
    audio = pa.array(encoded, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"audio": audio, text_column: [clip.text for clip in clips]})
    features = {"audio": {"_type": "Audio"}, text_column: {"dtype": "string", "_type": "Value"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    (folder / "data").mkdir(parents=True)
    pq.write_table(table, folder / "data" / "test-00000-of-00001.parquet")
    return folder


def test_a_hugging_face_audio_data_set_reads_like_the_folder(tmp_path, monkeypatch):
    """hf:NAME[:CONFIG[:SPLIT]] streams the first clips of an audio data set (here a local one, as the hub
    lays it out), decodes the audio bytes and finds the transcript column; resampled when its rate differs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder needs no hub
    folder = read_clips("builtin:speech", RATE, 3)
    data = _audio_parquet(tmp_path / "set", folder)
    clips = read_clips(f"hf:{data}::test", RATE, 2)
    assert [c.text for c in clips] == [c.text for c in folder[:2]]
    assert all(np.allclose(a.audio, b.audio, atol=1e-4) for a, b in zip(clips, folder, strict=False))
    assert clips[0].resampled_from is None and str(clips[0].path).endswith("#0")
    assert read_clips(f"hf:{data}::test", 8000, 1)[0].resampled_from == RATE


def test_bad_hugging_face_audio_data_sets_are_clear_errors(tmp_path, monkeypatch):
    import pytest

    from streamify.errors import InputError, UsageError

    folder = read_clips("builtin:speech", RATE, 1)
    data = _audio_parquet(tmp_path / "set", folder, text_column="label")
    with pytest.raises(InputError, match="needs an 'audio' column and a transcript column"):
        read_clips(f"hf:{data}::test", RATE)
    with pytest.raises(UsageError, match="malformed"):
        read_clips("hf:a:b:c:d", RATE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        read_clips("hf:someone/speech", RATE)

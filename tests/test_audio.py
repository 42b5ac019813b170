"""Audio data: decoding, resampling, the crop rule, bad files, Arabic Speech Commands, speaker-disjoint episodes."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from metassl.data.audio import fit_length, load_audio, read_clip, resample
from metassl.data.episodes import EpisodeSampler, FewShotSplit
from metassl.errors import DataError


def sine(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3100.0])
def test_a_sine_keeps_its_frequency_through_resampling(freq):
    out = resample(sine(freq, 16000), 16000, 8000)
    assert len(out) == 8000
    assert abs(peak_hz(out, 8000) - freq) <= 1.0  # 1 Hz bins over one second
    assert 0.45 < np.abs(out[500:-500]).max() < 0.55  # the amplitude survives in the pass band


def test_resampling_removes_what_the_new_rate_cannot_hold():
    out = resample(sine(6000.0, 16000), 16000, 8000)  # above the new Nyquist frequency (4 kHz)
    assert np.abs(out[500:-500]).max() < 0.01


def test_crop_rule_keeps_the_centre_and_pads_both_ends():
    wave = np.arange(10, dtype=np.float32)
    assert fit_length(wave, 4).tolist() == [3, 4, 5, 6]
    assert fit_length(wave, 10).tolist() == wave.tolist()
    assert fit_length(np.ones(3, np.float32), 6).tolist() == [0, 1, 1, 1, 0, 0]


def write(path, wave, rate, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave, rate, **kw)
    return path


def test_read_clip_makes_mono_resamples_and_fits_the_length(tmp_path):
    stereo = np.stack([sine(500, 16000, 1.5), sine(500, 16000, 1.5)], axis=1)
    clip = read_clip(write(tmp_path / "a.wav", stereo, 16000), 8000, 8000)
    assert clip.shape == (8000,) and clip.dtype == np.float32
    assert abs(peak_hz(clip, 8000) - 500) <= 1.0
    flac = read_clip(write(tmp_path / "b.flac", sine(700, 8000, 0.5), 8000), 8000, 8000)
    assert np.all(flac[:2000] == 0) and np.all(flac[-2000:] == 0) and np.abs(flac[2000:6000]).max() > 0.4


@pytest.mark.parametrize("case, message", [
    ("empty", "is empty"),
    ("silent", "is silent"),
    ("garbage", "cannot read the audio file"),
    ("low_rate", "below data.sample_rate=8000"),
    ("nan", "NaN or infinite"),
    ("huge", "more than 4 times full scale"),
])
def test_bad_audio_files_give_one_line_errors(tmp_path, case, message):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        write(path, np.zeros(0, np.float32), 8000)
    elif case == "silent":
        write(path, np.zeros(8000, np.float32), 8000)
    elif case == "garbage":
        path.write_bytes(b"RIFF not really a wave file" * 10)
    elif case == "low_rate":
        write(path, sine(300, 4000), 4000)
    elif case == "huge":
        write(path, sine(300, 8000) * 1e30, 8000, subtype="FLOAT")
    else:
        wave = sine(300, 8000)
        wave[100] = np.nan
        write(path, wave, 8000, subtype="FLOAT")
    with pytest.raises(DataError, match=message) as err:
        read_clip(path, 8000, 8000)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def make_folder(root, classes=6, per_class=4, rate=8000):
    for c in range(classes):
        for i in range(per_class):
            write(root / f"word{c}" / f"clip{i}.wav", sine(200 + 150 * c + 10 * i, rate), rate)
    return root


def test_audio_folder_splits_its_classes_like_an_image_folder(tmp_path):
    root = make_folder(tmp_path / "words")
    (root / "word0" / "notes.txt").write_text("not audio")
    parts = {s: load_audio(f"audio:{root}", s) for s in ("train", "val", "test")}
    names = [set(p.class_names) for p in parts.values()]
    assert sum(len(n) for n in names) == 6 and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for p in parts.values():
        assert p.x.shape[1:] == (1, 8000) and p.x.dtype == torch.float32 and p.min_class_size == 4
    again = load_audio(f"audio:{root}", "test")
    assert torch.equal(again.x, parts["test"].x)


def test_audio_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="audio folder .* does not exist.*<clip>.wav"):
        load_audio(f"audio:{tmp_path / 'missing'}", "train")
    root = make_folder(tmp_path / "words")
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="holds no audio"):
        for s in ("train", "val", "test"):
            load_audio(f"audio:{root}", s)
    with pytest.raises(DataError, match="needs a folder"):
        load_audio("audio", "train")


def test_unseen_audio_folder_must_not_share_meta_train_classes(tmp_path):
    trained = make_folder(tmp_path / "trained")
    train_classes = load_audio(f"audio:{trained}", "train").class_names
    other = tmp_path / "other"
    write(other / train_classes[0] / "a.wav", sine(300, 8000), 8000)
    write(other / "fresh" / "a.wav", sine(300, 8000), 8000)
    with pytest.raises(DataError, match="meta-train classes of the run"):
        load_audio(f"audio:{other}", "test", trained_on=trained)


def grouped_split(per_group: int, groups: int, classes: int) -> FewShotSplit:
    labels = np.repeat(np.arange(classes), groups * per_group)
    group = np.tile(np.repeat(np.arange(groups), per_group), classes)
    x = torch.randn(len(labels), 1, 16)
    return FewShotSplit(x, torch.from_numpy(labels), tuple(f"c{i}" for i in range(classes)), "grouped",
                        groups=group, group_names=tuple(f"g{i}" for i in range(groups)))


def test_disjoint_groups_keep_support_and_query_groups_apart():
    split = grouped_split(per_group=3, groups=10, classes=5)
    sampler = EpisodeSampler(split, 5, 5, 15, seed=3, disjoint_groups=True)
    seen = set()
    for i in range(50):
        _, support, query = sampler.episode_indices(i)
        assert not set(split.groups[support]) & set(split.groups[query])
        seen.add(tuple(sorted(set(split.groups[support]))))
        again = sampler.episode_indices(i)
        assert np.array_equal(again[1], support) and np.array_equal(again[2], query)
    assert len(seen) > 10  # the halves change from episode to episode


def test_disjoint_groups_refuse_what_an_episode_could_not_fill():
    split = grouped_split(per_group=3, groups=4, classes=5)  # a half of the groups holds 6 examples
    with pytest.raises(DataError, match="n_query=7 .* use n_query <= 6"):
        EpisodeSampler(split, 5, 1, 7, disjoint_groups=True)
    plain = FewShotSplit(split.x, split.y, split.class_names, "plain")
    with pytest.raises(DataError, match="has no groups"):
        EpisodeSampler(plain, 5, 1, 1, disjoint_groups=True)


def test_arabic_speech_commands_splits(speech_root):
    parts = {s: load_audio("arabic_speech_commands", s, root=speech_root) for s in ("train", "val", "test")}
    assert [p.num_classes for p in parts.values()] == [24, 6, 10]
    assert [len(p.x) for p in parts.values()] == [2160, 540, 900]
    assert parts["test"].x.shape[1:] == (1, 8000) and float(parts["test"].x.abs().max()) <= 1.0
    assert set(parts["test"].class_names) == {"close", "forward", "nine", "one", "record", "right", "rotate",
                                              "start", "stop", "three"}
    for p in parts.values():
        assert len(np.unique(p.groups)) == 30 and p.min_class_size == 90
    speakers = load_audio("arabic_speech_commands", "test", root=speech_root, class_split="speakers")
    assert speakers.num_classes == 6 and len(speakers.x) == 180 and len(np.unique(speakers.groups)) == 10
    half = load_audio("arabic_speech_commands", "test", root=speech_root, sample_rate=4000)
    assert half.x.shape[1:] == (1, 4000)


def test_arabic_speech_commands_is_checked(tmp_path, speech_root):
    with pytest.raises(DataError, match="asc_8k.npz does not exist"):
        load_audio("arabic_speech_commands", "train", root=tmp_path)
    (tmp_path / "asc_8k.npz").write_bytes(b"not the file")
    with pytest.raises(DataError, match="SHA-256 differs"):
        load_audio("arabic_speech_commands", "train", root=tmp_path)
    with pytest.raises(DataError, match="stored at 8000 Hz"):
        load_audio("arabic_speech_commands", "train", root=speech_root, sample_rate=16000)


def test_a_long_file_gives_its_centre_and_an_absurd_rate_is_refused(tmp_path):
    t = np.arange(16000 * 30) / 16000
    chirp = (0.5 * np.sin(2 * np.pi * (100 * t + 20 * t * t))).astype(np.float32)  # 100 Hz rising 40 Hz/s
    clip = read_clip(write(tmp_path / "long.wav", chirp, 16000), 8000, 8000)
    whole = resample(chirp, 16000, 8000)
    assert np.abs(clip - whole[len(whole) // 2 - 4000:len(whole) // 2 + 4000]).max() < 1e-4  # the whole file's centre
    assert abs(peak_hz(clip, 8000) - (100 + 40 * 15)) < 25  # 700 Hz at the 15th second
    with pytest.raises(DataError, match="claims a sample rate of 1000000 Hz"):
        read_clip(write(tmp_path / "fast.wav", sine(300, 8000), 1_000_000), 8000, 8000)


def test_a_float_file_slightly_over_full_scale_is_clipped(tmp_path):
    clip = read_clip(write(tmp_path / "hot.wav", sine(300, 8000, amp=1.5), 8000, subtype="FLOAT"), 8000, 8000)
    assert float(clip.max()) == 1.0 and float(clip.min()) == -1.0

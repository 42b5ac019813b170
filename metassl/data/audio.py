"""Spoken audio as few-shot splits with held-out classes: Arabic Speech Commands and folders of clips.

Dataset specs:

    arabic_speech_commands[:PATH]  Arabic Speech Commands (Ghandoura et al. 2021, CC BY 4.0) as
                      PATH/asc_8k.npz: 3,600 one-second clips at 8 kHz, 40 keywords x 30 speakers
                      x 3 repetitions (the file is checked against its SHA-256). Without PATH,
                      `data.root`, then $METASSL_DATA/arabic_speech_commands.
    audio:PATH        a folder of WAV, FLAC or OGG files, one subfolder per class, in either layout
                      of image folders: PATH/{train,val,test}/<class>/<clip> (classes split by hand)
                      or PATH/<class>/<clip> (a seeded class split; see metassl.data.imagefolder).

Classes. Arabic Speech Commands' keywords are split as its `splits.json` says: the 40 keyword
names sorted, shuffled with `random.Random(0)`, 24 meta-train / 6 meta-val / 10 meta-test. Every
split holds all 30 speakers; each row's speaker is its group (`FewShotSplit.groups`), so an
`EpisodeSampler(disjoint_groups=True)` draws support and queries from different speakers.
`class_split="speakers"` makes the speakers the classes instead (few-shot speaker
identification): the authors' 18 / 6 / 6 speakers, each with their recordings of the split's
keywords (so the test speakers' clips are of meta-test keywords, which no run trains on), and
the keyword as the group.

Clips. Every clip becomes `[1, T]` float32 in [-1, 1], T = round(sample_rate * clip_seconds):
multi-channel files are averaged to mono; a file recorded at a higher rate than `sample_rate`
is resampled with `scipy.signal.resample_poly` (a polyphase filter); one at a lower rate is
refused (upsampling cannot restore the missing band). The crop rule: a longer clip keeps its
centre T samples; a shorter one is zero-padded equally at both ends (one more sample at the
end when the padding is odd). Samples are clipped to [-1, 1] (floating-point files may exceed
full scale). Empty, unreadable, non-finite, silent (peak below SILENCE_PEAK) and wildly
over-range files (peak above MAX_PEAK, 12 dB over full scale) are refused with an error naming
the file.
"""
from __future__ import annotations

import hashlib
import json
import random
from math import gcd
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from metassl.data.episodes import FewShotSplit
from metassl.data.imagefolder import DEFAULT_FRACTIONS, split_folders, same_folder, unseen_folders
from metassl.data.paths import data_home
from metassl.errors import DataError

AUDIO_DATASETS = ("arabic_speech_commands", "audio")
CLASS_SPLITS = ("primary", "speakers")  # primary: the keywords are the classes
SPLITS = ("train", "val", "test")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
SILENCE_PEAK = 1e-4  # a clip whose largest |sample| is below this (-80 dBFS) is silent
MAX_RATE = 384_000  # a file claiming a higher sample rate is refused (its header is more likely wrong)
MAX_PEAK = 4.0  # float files may exceed full scale a little (then clipped to [-1, 1]); more than 12 dB is refused
ASC_FILE = "asc_8k.npz"
ASC_SHA256 = "0653bd80447da5e42f6d2c1ef19b050a5edf51d3a6dce46f695a014e9e0ff382"
ASC_SAMPLE_RATE = 8000
ASC_SPLIT_SIZES = (24, 6, 10)
ASC_HELP = ("Arabic Speech Commands as asc_8k.npz (3,600 clips at 8 kHz, built from the WAVs of "
            "github.com/abdulkaderghandoura/arabic-speech-commands-dataset at commit 72f34382)")


def is_audio(spec: str) -> bool:
    """True when the dataset spec names audio (arabic_speech_commands, audio:PATH)."""
    return spec.partition(":")[0] in AUDIO_DATASETS


def clip_samples(sample_rate: int, clip_seconds: float) -> int:
    """T, the samples of every clip: round(sample_rate * clip_seconds)."""
    samples = int(round(sample_rate * clip_seconds))
    if samples < 1:
        raise DataError(f"data.clip_seconds={clip_seconds} at data.sample_rate={sample_rate} gives {samples} "
                        "samples per clip; use a longer clip")
    return samples


def fit_length(wave: np.ndarray, samples: int) -> np.ndarray:
    """`wave` [L] cut or padded to `samples` by the crop rule: its centre, or zeros on both sides."""
    n = len(wave)
    if n >= samples:
        start = (n - samples) // 2
        return wave[start:start + samples]
    before = (samples - n) // 2
    return np.pad(wave, (before, samples - n - before))


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`wave` (float, [L]) recorded at `rate` Hz, resampled to `target` Hz (polyphase; `target <= rate`)."""
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def read_clip(file: Path, sample_rate: int, samples: int) -> np.ndarray:
    """The clip at `file` as float32 [samples] at `sample_rate` Hz (mono, resampled, cropped or padded).

    Only the centre of a long file is decoded: the samples that the crop rule keeps (and a few
    around them for the resampling filter), so a file of hours costs what a clip costs.
    """
    import soundfile

    try:
        info = soundfile.info(str(file))
        rate, frames = int(info.samplerate), int(info.frames)
        if not 0 < rate <= MAX_RATE:
            raise DataError(f"the audio file {file} claims a sample rate of {rate} Hz; expected 1 to {MAX_RATE}")
        if frames <= 0:
            raise DataError(f"the audio file {file} is empty (no samples)")
        if rate < sample_rate:
            raise DataError(f"the audio file {file} is recorded at {rate} Hz, below data.sample_rate={sample_rate}: "
                            f"upsampling cannot restore what it lacks; set data.sample_rate <= {rate}")
        up, down = sample_rate // gcd(rate, sample_rate), rate // gcd(rate, sample_rate)
        # the kept span, with margins of twice the resampling filter's reach on each side (resample_poly's
        # filter spans 10 * max(up, down) taps of the upsampled signal either side of a sample)
        margin = 2 * (10 * max(up, down) // up + 1) + 8
        need = -(-samples * rate // sample_rate) + 2 * margin
        start = max((frames - need) // 2, 0)
        wave, _ = soundfile.read(str(file), start=start, frames=min(need, frames), dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
        raise DataError(f"cannot read the audio file {file} ({err}); expected WAV, FLAC or OGG") from None
    if wave.shape[0] == 0:
        raise DataError(f"the audio file {file} is empty (no samples)")
    wave = check_wave(wave.mean(axis=1), f"the audio file {file}")
    return np.clip(fit_length(resample(wave, rate, sample_rate), samples), -1.0, 1.0).astype(np.float32)


def check_wave(wave: np.ndarray, what: str) -> np.ndarray:
    """`wave` (1-D float) unchanged, or DataError naming `what` when it is not finite, silent or far over range."""
    if not np.isfinite(wave).all():
        raise DataError(f"{what} holds NaN or infinite samples")
    peak = float(np.abs(wave).max())
    if peak < SILENCE_PEAK:
        raise DataError(f"{what} is silent (peak below {SILENCE_PEAK:g}); remove it")
    if peak > MAX_PEAK:
        raise DataError(f"{what} has samples of {peak:.3g}, more than {MAX_PEAK:g} times full scale; it is not "
                        "audio in [-1, 1] (rescale it)")
    return wave


def read_audio_classes(class_folders: Sequence[Path], name: str, sample_rate: int, clip_seconds: float) -> FewShotSplit:
    """The clips of `class_folders` (class c is class_folders[c]) as a FewShotSplit of [N, 1, T] waveforms."""
    samples = clip_samples(sample_rate, clip_seconds)
    waves, labels = [], []
    for label, folder in enumerate(class_folders):
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise DataError(f"class folder {folder} holds no audio; expected files ending in "
                            f"{', '.join(AUDIO_EXTENSIONS)}")
        waves.extend(read_clip(f, sample_rate, samples) for f in files)
        labels.extend([label] * len(files))
    x = torch.from_numpy(np.stack(waves)).unsqueeze(1)
    return FewShotSplit(x, torch.tensor(labels, dtype=torch.int64), tuple(f.name for f in class_folders), name)


def load_audio(spec: str, split: str, *, root: str | Path | None = None, sample_rate: int = ASC_SAMPLE_RATE,
               clip_seconds: float = 1.0, class_split: str = "primary",
               split_fractions: Sequence[float] = DEFAULT_FRACTIONS, split_seed: int = 0,
               trained_on: str | Path | None = None) -> FewShotSplit:
    """Split `split` ("train", "val", "test") of the audio dataset `spec` (see the module doc).

    `trained_on` (audio: only), the folder a run was meta-trained on, makes another folder an
    unseen one: none of its classes may be a meta-train class of the run.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    name, _, path = spec.partition(":")
    if name == "arabic_speech_commands":
        if class_split not in CLASS_SPLITS:
            raise DataError(f"data.class_split={class_split!r} is not one of {list(CLASS_SPLITS)} for {name}")
        folder = Path(path or root).expanduser() if (path or root) else data_home() / name
        return asc_split(folder, split, class_split, sample_rate, clip_seconds)
    if name != "audio":
        raise DataError(f"{spec!r} is not an audio dataset; valid: arabic_speech_commands[:PATH], audio:PATH")
    if not (path or root):
        raise DataError("dataset 'audio' needs a folder: use 'audio:PATH'")
    if class_split != "primary":
        raise DataError(f"data.class_split={class_split!r}: a folder of audio has its classes from its folders; "
                        "leave data.class_split unset")
    source = Path(path or root).expanduser()
    if trained_on is not None and not same_folder(source, trained_on):
        folders, label = unseen_folders(source, split, trained_on, split_fractions, split_seed, kind="audio")
    else:
        folders, label = split_folders(source, split, split_fractions, split_seed, kind="audio")
    return read_audio_classes(folders, label, sample_rate, clip_seconds)


# --- Arabic Speech Commands ------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_ASC_LOADED: dict[tuple, dict[str, np.ndarray]] = {}  # this process's checked file, by path, size and mtime


def asc_arrays(folder: Path) -> dict[str, np.ndarray]:
    """The arrays of `folder`/asc_8k.npz, after its SHA-256 is checked (no pickle is loaded).

    Checked and read once per process while the file keeps its size and modification time, so the
    splits and episode shapes of one run or benchmark do not hash and decode it again each.
    """
    file = folder / ASC_FILE
    if not file.is_file():
        raise DataError(f"{file} does not exist: put {ASC_HELP} in {folder}, or set data.root (or use "
                        "'arabic_speech_commands:PATH') to the folder that holds it")
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _ASC_LOADED:
        if _sha256(file) != ASC_SHA256:
            raise DataError(f"{file} is not the expected asc_8k.npz (its SHA-256 differs from "
                            f"{ASC_SHA256[:16]}...); it may be damaged or another version")
        with np.load(file, allow_pickle=False) as npz:
            _ASC_LOADED.clear()  # one copy of the dataset at a time
            _ASC_LOADED[key] = {k: npz[k] for k in npz.files}
    return _ASC_LOADED[key]


def keyword_split(keyword_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """{"train", "val", "test": keywords}: the names sorted, shuffled with random.Random(0), cut 24/6/10."""
    keywords = sorted(keyword_names)
    random.Random(0).shuffle(keywords)
    a, b, _ = ASC_SPLIT_SIZES
    return dict(zip(SPLITS, (tuple(keywords[:a]), tuple(keywords[a:a + b]), tuple(keywords[a + b:]))))


def _check_splits_file(folder: Path, keywords: dict[str, tuple[str, ...]]) -> None:
    """When `folder` has splits.json, it must list the same keywords as the rule gives."""
    file = folder / "splits.json"
    if not file.is_file():
        return
    try:
        listed = json.loads(file.read_text(encoding="utf-8"))
        theirs = {s: tuple(listed[k]) for s, k in zip(SPLITS, ("meta_train", "meta_val", "meta_test"))}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{file} cannot be read as the dataset's split file ({err})") from None
    if {s: set(v) for s, v in theirs.items()} != {s: set(v) for s, v in keywords.items()}:
        raise DataError(f"{file} lists other keyword splits than the dataset's rule (sorted names shuffled with "
                        "random.Random(0), 24/6/10); the file or the data is not the expected one")


def asc_split(folder: Path, split: str, class_split: str, sample_rate: int, clip_seconds: float) -> FewShotSplit:
    """One split of Arabic Speech Commands (see the module doc for the classes and groups)."""
    if sample_rate > ASC_SAMPLE_RATE:
        raise DataError(f"data.sample_rate={sample_rate}: arabic_speech_commands is stored at {ASC_SAMPLE_RATE} Hz; "
                        f"use data.sample_rate <= {ASC_SAMPLE_RATE}")
    a = asc_arrays(folder)
    keyword_names = tuple(str(n) for n in a["keyword_names"])
    speaker_names = tuple(str(n) for n in a["speaker_names"])
    keywords = keyword_split(keyword_names)
    _check_splits_file(folder, keywords)
    keyword_of = a["keyword"].astype(np.int64)
    speaker_of = a["speaker"].astype(np.int64)
    in_split = np.isin(keyword_of, [keyword_names.index(k) for k in keywords[split]])
    if class_split == "primary":
        classes, labels_of = keywords[split], keyword_of
        groups_of, group_names = speaker_of, speaker_names
    else:
        subset = [str(n) for n in a["subset_names"]]
        wanted = subset.index(split) if split in subset else None
        if wanted is None:
            raise DataError(f"{folder / ASC_FILE} names speaker subsets {subset}, not {split!r}")
        classes = tuple(n for i, n in enumerate(speaker_names) if a["speaker_subset"][i] == wanted)
        in_split &= np.isin(speaker_of, [speaker_names.index(s) for s in classes])
        labels_of, groups_of, group_names = speaker_of, keyword_of, keyword_names
    all_names = keyword_names if class_split == "primary" else speaker_names
    index = {all_names.index(c): i for i, c in enumerate(classes)}
    rows = np.flatnonzero(in_split)
    samples = clip_samples(sample_rate, clip_seconds)
    offsets, lengths, audio = a["offsets"], a["lengths"], a["audio"]
    waves = np.stack([
        fit_length(resample(audio[offsets[r]:offsets[r] + lengths[r]].astype(np.float32) / 32768.0,
                            ASC_SAMPLE_RATE, sample_rate), samples) for r in rows
    ]).astype(np.float32)
    labels = torch.tensor([index[int(labels_of[r])] for r in rows], dtype=torch.int64)
    return FewShotSplit(torch.from_numpy(waves).unsqueeze(1), labels, classes,
                        f"arabic_speech_commands/{'keywords' if class_split == 'primary' else 'speakers'}/{split}",
                        groups=groups_of[rows].astype(np.int64), group_names=group_names,
                        group_kind="speakers" if class_split == "primary" else "keywords")

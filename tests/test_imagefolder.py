"""Image folders with held-out classes: both layouts, the seeded class split, overlap refusals,
a short training run and `metassl eval` on another folder."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metassl import config, registry
from metassl.cli import main
from metassl.data import imagefolder, load_split
from metassl.data.imagefolder import split_class_names, split_counts
from metassl.errors import DataError
from metassl.trainer import run_local


def write_classes(root: Path, names, images: int = 4, size: int = 12, seed: int = 0) -> Path:
    """Writes `images` random grey PNGs into root/<name>/ for each name; returns root."""
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(images):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


NAMES = [f"c{i:02d}" for i in range(10)]


def load(root, split, **kwargs):
    return load_split(f"imagefolder:{root}", split, image_size=8, **kwargs)


# ---------------------------------------------------------------- layout (b): seeded class split


def test_seeded_split_is_disjoint_covers_every_class_and_loads_only_its_classes(tmp_path, monkeypatch):
    root = write_classes(tmp_path / "pets", NAMES)
    read = []
    real_read = imagefolder._read_image
    monkeypatch.setattr(imagefolder, "_read_image", lambda file, *a: read.append(file) or real_read(file, *a))

    splits = {s: load(root, s) for s in ("train", "val", "test")}
    names = {s: set(d.class_names) for s, d in splits.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert names["train"] | names["val"] | names["test"] == set(NAMES)
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    test = splits["test"]
    assert test.x.shape == (8, 1, 8, 8) and test.y.tolist() == [0] * 4 + [1] * 4
    assert list(test.class_names) == sorted(test.class_names)
    assert test.name == "imagefolder/pets:test(split_seed=0, split_fractions=0.6/0.2/0.2)"

    read.clear()
    load(root, "val")
    assert len(read) == 8 and {f.parent.name for f in read} == names["val"]  # no other class decoded


def test_split_depends_only_on_names_fractions_and_seed(tmp_path):
    a = write_classes(tmp_path / "a", NAMES)
    b = write_classes(tmp_path / "b", list(reversed(NAMES)), seed=1)  # other creation order, other pixels
    for split in ("train", "val", "test"):
        assert load(a, split).class_names == load(b, split).class_names
        assert load(a, split, split_seed=3).class_names == load(b, split, split_seed=3).class_names
    assert split_class_names(NAMES, seed=0) == split_class_names(list(reversed(NAMES)), seed=0)
    assert split_class_names(NAMES, seed=0) != split_class_names(NAMES, seed=1)
    assert load(a, "test").class_names != load(a, "test", split_seed=1).class_names
    # pinned: the split must not change across machines, processes or library versions
    assert split_class_names(NAMES, seed=0)["test"] == GOLDEN_TEST_SEED0
    other = split_class_names(NAMES, (0.4, 0.3, 0.3), seed=0)
    assert [len(other[s]) for s in ("train", "val", "test")] == [4, 3, 3]


GOLDEN_TEST_SEED0 = ("c01", "c03")  # SHA-256 of "0/cNN" orders the classes


def test_split_counts_sum_to_the_classes_and_give_every_split_one():
    for n in range(3, 60):
        for fractions in [(0.6, 0.2, 0.2), (0.8, 0.1, 0.1), (1 / 3, 1 / 3, 1 / 3), (0.5, 0.25, 0.25)]:
            try:
                counts = split_counts(n, fractions)
            except DataError as err:
                assert "gives the" in str(err) and n * min(fractions) < 1
                continue
            assert sum(counts) == n and min(counts) >= 1
            assert all(abs(c - f * n) < 1 for c, f in zip(counts, fractions))


def test_too_few_classes_or_a_split_with_none_is_refused(tmp_path):
    small = write_classes(tmp_path / "small", ["a", "b"])
    with pytest.raises(DataError, match=r"small.*at least 3 classes.*got 2"):
        load(small, "train")
    assert load(small, "all").num_classes == 2  # the whole folder is still readable
    four = write_classes(tmp_path / "four", ["a", "b", "c", "d"])
    with pytest.raises(DataError, match=r"gives the 'test' split 0 of the 4 classes"):
        load(four, "test", split_fractions=(0.8, 0.1, 0.1))
    with pytest.raises(DataError, match="three fractions > 0"):
        load(four, "test", split_fractions=(0.5, 0.5))
    with pytest.raises(DataError, match="unknown split 'trainval'"):
        load(four, "trainval")


# ---------------------------------------------------------------- layout (a): train/, val/, test/


def write_split_folder(root: Path, train=("a", "b", "c"), val=("d", "e"), test=("f", "g")) -> Path:
    for split, names in (("train", train), ("val", val), ("test", test)):
        write_classes(root / split, names)
    return root


def test_split_subfolders_are_used_as_given(tmp_path):
    root = write_split_folder(tmp_path / "hand")
    assert load(root, "train").class_names == ("a", "b", "c")
    assert load(root, "val").class_names == ("d", "e")
    test = load(root, "test", split_fractions=(0.2, 0.2, 0.6), split_seed=9)  # ignored for layout (a)
    assert test.class_names == ("f", "g") and test.name == "imagefolder/hand:test"
    assert load(root, "all").num_classes == 7


def test_split_subfolders_missing_extra_or_overlapping_are_refused(tmp_path):
    partial = write_classes(tmp_path / "partial", ["train", "test"])
    with pytest.raises(DataError, match=r"has train/, test/ but no val/"):
        load(partial, "train")
    extra = write_split_folder(tmp_path / "extra")
    write_classes(extra, ["stray"])
    with pytest.raises(DataError, match="also 'stray'"):
        load(extra, "val")
    overlap = write_split_folder(tmp_path / "overlap", test=("f", "b", "a"))
    for split in ("train", "val", "test"):  # any split of such a folder: a run must not start
        with pytest.raises(DataError, match=r"2 class\(es\) are in both train and test: 'a', 'b'"):
            load(overlap, split)
    empty = write_split_folder(tmp_path / "empty")
    for d in (empty / "val").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    with pytest.raises(DataError, match=r"val has no class subfolders"):
        load(empty, "test")


# ---------------------------------------------------------------- training and evaluation


TINY = ["model.hidden=8", "model.norm=layer", "episodes.n_way=2", "episodes.k_shot=1", "episodes.n_query=2",
        "episodes.meta_batch=2", "train.steps=4", "train.log_every=2", "train.val_every=2",
        "train.val_episodes=5", "train.checkpoint_every=2", "eval.episodes=10", "eval.n_query=2",
        "data.image_size=16"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ProtoNet run on a 10-class folder, with every split it loaded."""
    base = tmp_path_factory.mktemp("imagefolder")
    folder = write_classes(base / "train_folder", NAMES)
    cfg = config.load("experiments/digits_protonet.yaml", TINY + [f"data.dataset=imagefolder:{folder}"])
    loaded = []
    real = registry.load_split

    def recording(spec, split, **kwargs):
        data = real(spec, split, **kwargs)
        loaded.append((split, data))
        return data

    mp = pytest.MonkeyPatch()
    mp.setattr(registry, "load_split", recording)
    try:
        result = run_local(cfg, base / "run", log=lambda *_: None)
    finally:
        mp.undo()
    return base, folder, result, loaded


def test_a_run_trains_selects_and_tests_on_disjoint_classes(trained):
    base, folder, result, loaded = trained
    classes = {}
    for split, data in loaded:
        classes.setdefault(split, set()).update(data.class_names)
    assert set(classes) == {"train", "val", "test"}
    assert not classes["train"] & classes["test"] and not classes["train"] & classes["val"]
    assert not classes["val"] & classes["test"]
    assert classes["test"] == set(split_class_names(NAMES)["test"])
    protocol = result["test"]["protocol"]
    assert protocol["split"] == "test" and protocol["dataset"] == f"imagefolder:{folder}"
    saved = config.load(base / "run" / "config.yaml")  # the split is recorded with the run
    assert saved.data.split_fractions == (0.6, 0.2, 0.2) and saved.data.split_seed == 0
    assert protocol["classes"].startswith("imagefolder/train_folder:test(split_seed=0")


def test_eval_on_an_unseen_folder_works_and_on_seen_classes_is_refused(trained, tmp_path, capsys):
    base, folder, _, _ = trained
    run = str(base / "run")
    other = write_classes(tmp_path / "other", ["x1", "x2", "x3"], seed=5)  # a folder of 3 new classes
    assert main(["eval", run, "--data", f"imagefolder:{other}", "--episodes", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["episodes"] == 6 and out["protocol"]["dataset"] == f"imagefolder:{other}"
    assert registry.build_sampler(config.load(base / "run" / "config.yaml"), "test", n_way=2, k_shot=1, n_query=2,
                                  seed=0, dataset=f"imagefolder:{other}").split.class_names == ("x1", "x2", "x3")

    hand = write_split_folder(tmp_path / "hand", train=NAMES[:3], val=("v1", "v2"), test=("t1", "t2"))
    assert main(["eval", run, "--data", f"imagefolder:{hand}", "--episodes", "4", "--json"]) == 0  # test/ only
    capsys.readouterr()

    train_class = split_class_names(NAMES)["train"][0]
    seen = write_classes(tmp_path / "seen", ["x1", "x2", train_class])
    assert main(["eval", run, "--data", f"imagefolder:{seen}", "--episodes", "4"]) == 2
    err = capsys.readouterr().err
    assert f"1 class(es) of {seen} are meta-train classes of the run" in err and repr(train_class) in err
    # the training folder itself still gives its own held-out test classes
    assert main(["eval", run, "--data", f"imagefolder:{folder}", "--episodes", "4"]) == 0


def test_eval_on_another_folder_needs_the_training_folder(tmp_path):
    folder = write_classes(tmp_path / "gone", NAMES)
    other = write_classes(tmp_path / "other", ["x1", "x2", "x3"])
    cfg = config.load("experiments/digits_protonet.yaml", TINY + [f"data.dataset=imagefolder:{folder}"])
    for d in folder.iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    folder.rmdir()
    with pytest.raises(DataError, match=r"cannot check that the classes of .*other were not trained on"):
        registry.build_sampler(cfg, "test", n_way=2, k_shot=1, n_query=2, seed=0, dataset=f"imagefolder:{other}")

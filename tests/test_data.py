"""Tests of metassl.data: episode sampling, the datasets, their loaders and their errors.

Tests that read the shared Omniglot data take conftest's `omniglot_root` fixture, which
skips them when the data is absent.
"""

from __future__ import annotations

import functools
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metassl.data.omniglot as omniglot_module
from metassl.data import (
    DIGITS_SPLITS,
    Episode,
    EpisodeSampler,
    FewShotSplit,
    SinusoidTasks,
    download_omniglot,
    load_digits,
    load_imagefolder,
    load_omniglot,
    load_split,
    stack_episodes,
)
from metassl.data.omniglot import split_classes
from metassl.errors import DataError


# ---------------------------------------------------------------- helpers


def index_split(class_sizes: list[int]) -> FewShotSplit:
    """Returns a split whose image i is filled with the value i, so episodes reveal their rows."""
    y = torch.repeat_interleave(torch.arange(len(class_sizes)), torch.tensor(class_sizes))
    x = torch.arange(len(y), dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    names = tuple(f"class{c}" for c in range(len(class_sizes)))
    return FewShotSplit(x=x, y=y, class_names=names, name="synthetic")


def rows_of(images: torch.Tensor) -> np.ndarray:
    """Returns the row ids encoded by index_split in images [n, 1, 2, 2]."""
    return images[:, 0, 0, 0].long().numpy()


def episodes_equal(a: Episode, b: Episode) -> bool:
    """Returns whether all four tensors of a and b are identical."""
    return all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y")
    )


def write_ink_png(path: Path, ink: np.ndarray) -> None:
    """Writes bool ink [H, W] as a 1-bit PNG in Omniglot's convention: black ink (0) on white."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(~ink).save(path)


def write_fake_omniglot(root: Path, characters: dict[str, int], evaluation: set[str], size: int = 21) -> None:
    """Writes a folder-layout Omniglot at root: each "Alphabet/characterNN" with n random PNGs.

    Characters in `evaluation` go to images_evaluation, the others to images_background.
    """
    rng = np.random.default_rng(0)
    for top in ("images_background", "images_evaluation"):
        (root / top).mkdir(parents=True, exist_ok=True)
    for name, count in characters.items():
        top = "images_evaluation" if name in evaluation else "images_background"
        for drawing in range(count):
            write_ink_png(root / top / name / f"0001_{drawing + 1:02d}.png", rng.random((size, size)) < 0.3)


def write_split_lists(root: Path, splits: dict[str, list[str]]) -> None:
    """Writes root/splits/vinyals/<split>.txt listing each character with all four rotations."""
    folder = root / "splits" / "vinyals"
    folder.mkdir(parents=True, exist_ok=True)
    for split, characters in splits.items():
        lines = [f"{c}/rot{r:03d}" for c in characters for r in (0, 90, 180, 270)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


def zip_folders(root: Path, out: Path) -> None:
    """Writes out/<name>.zip of root/<name> for images_background and images_evaluation."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(out / f"{name}.zip", "w") as zf:
            for file in sorted((root / name).rglob("*")):
                zf.write(file, file.relative_to(root).as_posix())


@functools.lru_cache(maxsize=None)
def shared_omniglot(root: Path, split: str, protocol: str) -> FewShotSplit:
    """Returns a split of the shared Omniglot data, loaded once per test session."""
    return load_omniglot(root, split, protocol)


# ---------------------------------------------------------------- episodes


def test_same_seed_gives_identical_episodes_and_other_seeds_differ():
    split = index_split([30] * 10)
    a, b = EpisodeSampler(split, 5, 1, 3, seed=7), EpisodeSampler(split, 5, 1, 3, seed=7)
    other = EpisodeSampler(split, 5, 1, 3, seed=8)
    for i in range(20):
        assert episodes_equal(a.episode(i), b.episode(i))
    assert not all(episodes_equal(a.episode(i), other.episode(i)) for i in range(20))
    assert not episodes_equal(a.episode(0), a.episode(1))


def test_episode_depends_only_on_its_index():
    sampler = EpisodeSampler(index_split([30] * 10), 5, 2, 3, seed=1)
    first = sampler.episode(7)
    for i in range(7):
        sampler.episode(i)
    assert episodes_equal(first, sampler.episode(7))
    batch = sampler.batch(5, 3)
    assert batch.batched and batch.num_tasks == 3
    assert batch.support_x.shape == (3, 10, 1, 2, 2) and batch.query_y.shape == (3, 15)
    assert torch.equal(batch.query_x[2], first.query_x) and torch.equal(batch.support_y[2], first.support_y)


def test_episode_structure_labels_counts_and_disjoint_sets():
    sizes = [12, 9, 15, 9, 20, 11, 9]
    split = index_split(sizes)
    n_way, k_shot, n_query = 4, 3, 6
    sampler = EpisodeSampler(split, n_way, k_shot, n_query, seed=0)
    true_class = split.y.numpy()
    for i in range(50):
        episode = sampler.episode(i)
        assert episode.num_tasks is None
        assert episode.support_x.shape == (n_way * k_shot, 1, 2, 2)
        assert episode.support_x.dtype == torch.float32
        assert episode.support_y.dtype == torch.int64
        # label-major: [0]*k, [1]*k, ...
        assert torch.equal(episode.support_y, torch.arange(n_way).repeat_interleave(k_shot))
        assert torch.equal(episode.query_y, torch.arange(n_way).repeat_interleave(n_query))
        support, query = rows_of(episode.support_x), rows_of(episode.query_x)
        assert len(set(support)) == len(support) and len(set(query)) == len(query)
        assert not set(support) & set(query)
        classes, s_rows, q_rows = sampler.episode_indices(i)
        assert np.array_equal(s_rows, support) and np.array_equal(q_rows, query)
        assert len(set(classes.tolist())) == n_way
        for label in range(n_way):
            s_true = true_class[support[episode.support_y.numpy() == label]]
            q_true = true_class[query[episode.query_y.numpy() == label]]
            assert set(s_true) == set(q_true) == {classes[label]}


def test_every_class_and_label_order_is_used():
    sampler = EpisodeSampler(index_split([5] * 6), 3, 1, 1, seed=0)
    firsts = {int(sampler.episode_indices(i)[0][0]) for i in range(200)}
    assert firsts == set(range(6))


@pytest.mark.parametrize(
    ("n_way", "k_shot", "n_query", "expected"),
    [
        (30, 1, 1, ["n_way=30", "only 7 classes", "'synthetic'"]),
        (1, 1, 1, ["n_way", ">= 2", "1"]),
        (3, 5, 5, ["10", "class2", "only 6"]),
        (3, 0, 1, ["k_shot", ">= 1"]),
        (3, 1, 0, ["n_query", ">= 1"]),
    ],
)
def test_sampler_rejects_impossible_episodes(n_way, k_shot, n_query, expected):
    split = index_split([8, 9, 6, 12, 10, 10, 10])
    with pytest.raises(DataError) as info:
        EpisodeSampler(split, n_way, k_shot, n_query)
    for text in expected:
        assert text in str(info.value)


def test_sampler_rejects_negative_index_and_stack_rejects_empty():
    sampler = EpisodeSampler(index_split([4] * 3), 2, 1, 1)
    with pytest.raises(DataError, match="-1"):
        sampler.episode(-1)
    with pytest.raises(DataError, match="empty"):
        stack_episodes([])


def test_split_rejects_labels_outside_class_names():
    with pytest.raises(DataError, match="0..1"):
        FewShotSplit(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]), ("a", "b"), "bad")


# ---------------------------------------------------------------- digits and sinusoid


def test_digits_splits_are_disjoint_upsampled_and_in_unit_range():
    loaded = {split: load_digits(split) for split in ("train", "val", "test")}
    digit_sets = [set(DIGITS_SPLITS[s]) for s in loaded]
    assert sum(map(len, digit_sets)) == len(set().union(*digit_sets)) == 10
    for split, data in loaded.items():
        assert data.x.shape[1:] == (1, 28, 28) and data.x.dtype == torch.float32
        assert 0.0 <= data.x.min() and data.x.max() <= 1.0 and data.x.max() > 0.9
        assert data.class_names == tuple(str(d) for d in DIGITS_SPLITS[split])
        assert data.num_classes == len(DIGITS_SPLITS[split]) and data.min_class_size > 150
    assert load_digits("all", image_size=8).x.shape == (1797, 1, 8, 8)
    with pytest.raises(DataError, match="train, val, test, all"):
        load_digits("holdout")


def test_sinusoid_tasks_are_deterministic_in_range_and_on_the_curve():
    tasks = SinusoidTasks(k_shot=5, n_query=10, seed=3)
    again = SinusoidTasks(k_shot=5, n_query=10, seed=3)
    assert episodes_equal(tasks.episode(4), again.episode(4))
    assert not episodes_equal(tasks.episode(4), SinusoidTasks(5, 10, seed=4).episode(4))
    for i in range(100):
        amplitude, phase = tasks.params(i)
        assert 0.1 <= amplitude <= 5.0 and 0.0 <= phase <= math.pi
        episode = tasks.episode(i)
        assert episode.support_x.shape == (5, 1) and episode.query_y.shape == (10, 1)
        x = torch.cat([episode.support_x, episode.query_x])
        y = torch.cat([episode.support_y, episode.query_y])
        assert x.dtype == y.dtype == torch.float32
        assert x.min() >= -5.0 and x.max() <= 5.0
        torch.testing.assert_close(y, amplitude * torch.sin(x - phase), atol=1e-5, rtol=1e-5)
    batch = tasks.batch(10, 4)
    assert batch.support_x.shape == (4, 5, 1) and torch.equal(batch.query_y[1], tasks.episode(11).query_y)


# ---------------------------------------------------------------- Omniglot on the shared data


@pytest.mark.parametrize(
    ("protocol", "split", "classes"),
    [
        ("supervised", "train", 4112),
        ("supervised", "val", 688),
        ("supervised", "test", 1692),
        ("unsupervised", "train", 1028),
        ("unsupervised", "val", 172),
        ("unsupervised", "test", 423),
    ],
)
def test_omniglot_class_counts(omniglot_root, protocol, split, classes):
    data = shared_omniglot(omniglot_root, split, protocol)
    assert data.num_classes == classes and data.name == f"omniglot/{protocol}/{split}"
    assert data.x.shape == (20 * classes, 1, 28, 28) and data.x.dtype == torch.float32
    assert torch.equal(torch.bincount(data.y), torch.full((classes,), 20))
    assert 0.0 <= data.x.min() and data.x.max() == 1.0


def test_omniglot_splits_are_disjoint_and_shipped_lists_match_the_shared_ones(omniglot_root):
    characters = {}
    for split in ("train", "val", "test"):
        assert split_classes(None, split) == split_classes(omniglot_root, split)
        characters[split] = {c for c, _ in split_classes(None, split)}
    assert len(characters["train"] | characters["val"] | characters["test"]) == 1028 + 172 + 423


def test_omniglot_rotation_classes_are_rotated_copies_of_the_unsupervised_class(omniglot_root):
    supervised = shared_omniglot(omniglot_root, "test", "supervised")
    unsupervised = shared_omniglot(omniglot_root, "test", "unsupervised")
    for name in (unsupervised.class_names[0], unsupervised.class_names[200]):
        assert name.endswith("/rot000")
        base = unsupervised.x[unsupervised.y == unsupervised.class_names.index(name)]
        character = name.rsplit("/", 1)[0]
        for turns, degrees in enumerate(("000", "090", "180", "270")):
            label = supervised.class_names.index(f"{character}/rot{degrees}")
            rotated = supervised.x[supervised.y == label]
            assert torch.equal(rotated, torch.rot90(base, turns, dims=(-2, -1)))


def test_omniglot_other_sizes_resize_the_full_bitmaps(omniglot_root):
    data = load_omniglot(omniglot_root, "val", "unsupervised", image_size=32)
    assert data.x.shape == (3440, 1, 32, 32)
    small = shared_omniglot(omniglot_root, "val", "unsupervised").x
    # same ink, measured at different resolutions
    torch.testing.assert_close(data.x.mean(dim=(1, 2, 3)), small.mean(dim=(1, 2, 3)), atol=0.01, rtol=0)


def test_omniglot_png_folders_reproduce_the_stored_28px_images(omniglot_root, tmp_path):
    npz = np.load(omniglot_root / "omniglot.npz")
    chosen = {s: [c for c, _ in split_classes(None, s)][:2] for s in ("train", "val", "test")}
    for characters in chosen.values():
        for character in characters:
            prefix = "background" if character in npz["background_character_names"] else "evaluation"
            code = list(npz[f"{prefix}_character_names"]).index(character)
            packed = npz[f"{prefix}_images105_packed"][npz[f"{prefix}_character"] == code]
            bitmaps = np.unpackbits(packed, axis=-1, count=105).astype(bool)
            for drawing, bitmap in enumerate(bitmaps):
                write_ink_png(tmp_path / f"images_{prefix}" / character / f"{drawing:02d}.png", bitmap)
    (tmp_path / "images_background").mkdir(exist_ok=True)
    (tmp_path / "images_evaluation").mkdir(exist_ok=True)
    write_split_lists(tmp_path, chosen)
    for split in ("train", "val", "test"):
        from_pngs = load_omniglot(tmp_path, split, "supervised")
        stored = shared_omniglot(omniglot_root, split, "supervised")
        assert from_pngs.num_classes == 8
        for label, name in enumerate(from_pngs.class_names):
            expected = stored.x[stored.y == stored.class_names.index(name)]
            assert torch.equal(from_pngs.x[from_pngs.y == label], expected), name


def test_registry_loads_omniglot_from_a_spec_path(omniglot_root):
    data = load_split(f"omniglot:{omniglot_root}", "val", protocol="unsupervised")
    assert data.num_classes == 172
    assert torch.equal(data.x, shared_omniglot(omniglot_root, "val", "unsupervised").x)


# ---------------------------------------------------------------- Omniglot without the shared data


def test_omniglot_folder_layout_on_a_fake_tree(tmp_path):
    characters = {"Alpha/character01": 3, "Alpha/character02": 3, "Evalish/character01": 4}
    write_fake_omniglot(tmp_path, characters, evaluation={"Evalish/character01"})
    write_split_lists(tmp_path, {"train": ["Alpha/character01", "Alpha/character02"],
                                 "test": ["Evalish/character01"]})
    train = load_omniglot(tmp_path, "train", "supervised")
    assert train.num_classes == 8 and train.x.shape == (24, 1, 28, 28)
    assert train.class_names[:2] == ("Alpha/character01/rot000", "Alpha/character01/rot090")
    test = load_omniglot(str(tmp_path), "test", "unsupervised", image_size=14)
    assert test.class_names == ("Evalish/character01/rot000",) and test.x.shape == (4, 1, 14, 14)
    # a 21x21 image of random ink averages to about 0.3 ink per 28x28 pixel
    assert 0.2 < float(train.x.mean()) < 0.4


def test_omniglot_split_list_naming_missing_characters_is_an_error(tmp_path):
    write_fake_omniglot(tmp_path, {"Alpha/character01": 2}, evaluation=set())
    write_split_lists(tmp_path, {"train": ["Alpha/character01", "Alpha/character09"]})
    with pytest.raises(DataError, match="Alpha/character09"):
        load_omniglot(tmp_path, "train")


def test_download_omniglot_from_a_file_url(tmp_path):
    characters = {"Alpha/character01": 2, "Evalish/character01": 2}
    write_fake_omniglot(tmp_path / "src", characters, evaluation={"Evalish/character01"})
    zip_folders(tmp_path / "src", tmp_path / "mirror")
    dest = download_omniglot(tmp_path / "dest", base_url=(tmp_path / "mirror").as_uri())
    assert sorted(p.name for p in dest.iterdir()) == ["images_background", "images_evaluation"]
    for root in (dest, tmp_path / "src"):
        write_split_lists(root, {"train": ["Alpha/character01", "Evalish/character01"]})
    data = load_omniglot(dest, "train", "unsupervised")
    assert data.num_classes == 2 and data.x.shape == (4, 1, 28, 28)
    assert torch.equal(data.x, load_omniglot(tmp_path / "src", "train", "unsupervised").x)


def test_default_root_downloads_and_uses_the_shipped_split_lists(tmp_path, monkeypatch):
    # every character of the shipped lists, with one drawing each; test characters as "evaluation"
    characters = {c: 1 for s in ("train", "val", "test") for c, _ in split_classes(None, s)}
    assert len(characters) == 1623
    test_characters = {c for c, _ in split_classes(None, "test")}
    write_fake_omniglot(tmp_path / "src", characters, test_characters, size=7)
    zip_folders(tmp_path / "src", tmp_path / "mirror")
    monkeypatch.setenv("METASSL_DATA", str(tmp_path / "data"))
    mirror = (tmp_path / "mirror").as_uri()
    monkeypatch.setattr(omniglot_module, "download_omniglot", lambda dest: download_omniglot(dest, mirror))
    val = load_split("omniglot", "val", image_size=14)  # 28x28 would read the shipped copy
    assert val.num_classes == 688 and val.x.shape == (688, 1, 14, 14)
    assert (tmp_path / "data" / "omniglot" / "images_evaluation").is_dir()


def test_default_root_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("METASSL_DATA", str(tmp_path / "data"))
    nowhere = (tmp_path / "no-mirror").as_uri()
    monkeypatch.setattr(omniglot_module, "download_omniglot", lambda dest: download_omniglot(dest, nowhere))
    with pytest.raises(DataError) as info:
        load_omniglot(None, "train", image_size=14)
    message = str(info.value)
    assert "could not download" in message and "METASSL_DATA" in message and "root" in message


def test_the_shipped_28x28_omniglot_loads_offline_with_its_checksum(tmp_path, monkeypatch):
    from metassl.data import omniglot_embedded

    monkeypatch.setenv("METASSL_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(omniglot_module, "download_omniglot",
                        lambda dest: pytest.fail("the 28x28 default must not download"))
    sizes = {}
    for split in ("train", "val", "test"):
        data = load_split("omniglot", split, protocol="unsupervised")
        sizes[split] = (data.num_classes, len(data.y))
        assert data.x.shape[1:] == (1, 28, 28) and data.x.dtype == torch.float32
        assert 0.0 <= float(data.x.min()) and float(data.x.max()) == 1.0
    assert sizes == {"train": (1028, 20560), "val": (172, 3440), "test": (423, 8460)}
    assert load_split("omniglot", "val").num_classes == 688  # supervised: 4 rotations per character
    assert not (tmp_path / "empty").exists()
    path = omniglot_embedded.EMBEDDED_DIR / "omniglot.npz"
    assert omniglot_embedded.sha256_of(path) == omniglot_embedded.EMBEDDED_SHA256
    assert (omniglot_embedded.EMBEDDED_DIR / "LICENSE").read_text().startswith("The MIT License")


def test_a_damaged_shipped_omniglot_is_refused_by_its_checksum(tmp_path, monkeypatch):
    from metassl.data import omniglot_embedded

    folder = tmp_path / "omniglot28"
    folder.mkdir()
    original = (omniglot_embedded.EMBEDDED_DIR / "omniglot.npz").read_bytes()
    (folder / "omniglot.npz").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    monkeypatch.setattr(omniglot_embedded, "EMBEDDED_DIR", folder)
    with pytest.raises(DataError, match="damaged: sha256"):
        load_omniglot(None, "val")
    (folder / "omniglot.npz").unlink()
    with pytest.raises(DataError, match="missing from this installation"):
        load_omniglot(None, "val")


def test_the_shipped_omniglot_is_rebuilt_bit_for_bit_from_the_full_data(omniglot_root, tmp_path):
    from metassl.data import omniglot_embedded

    path, digest = omniglot_embedded.build(omniglot_root, tmp_path)
    assert digest == omniglot_embedded.EMBEDDED_SHA256
    shipped = load_omniglot(None, "test", "unsupervised")
    assert torch.equal(shipped.x, load_omniglot(omniglot_root, "test", "unsupervised").x)


def test_download_rejects_a_file_that_is_not_a_zip(tmp_path):
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "images_background.zip").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="not a zip"):
        download_omniglot(tmp_path / "dest", base_url=(tmp_path / "mirror").as_uri())
    assert not (tmp_path / "dest" / "images_background").exists()


def test_omniglot_missing_or_empty_root_names_the_path_and_both_layouts(tmp_path):
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(DataError) as info:
            load_omniglot(root, "train")
        message = str(info.value)
        assert str(root) in message and "omniglot.npz" in message and "images_background" in message


@pytest.mark.parametrize("content", [b"this is not an npz file", "npz-without-omniglot-keys"])
def test_omniglot_corrupt_npz_names_the_file(tmp_path, content):
    path = tmp_path / "omniglot.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, something=np.zeros(3))
    with pytest.raises(DataError, match="omniglot.npz"):
        load_omniglot(tmp_path, "val")


def test_omniglot_rejects_unknown_split_and_protocol(tmp_path):
    with pytest.raises(DataError, match="train, val, test"):
        load_omniglot(tmp_path, "trainval")
    with pytest.raises(DataError, match="supervised, unsupervised, psco"):
        load_omniglot(tmp_path, "train", protocol="semi")


# ---------------------------------------------------------------- image folders and the registry


def write_image_tree(root: Path) -> None:
    """Writes classes b/ (2 images) and a/ (3 images, mixed formats and case) under root."""
    rng = np.random.default_rng(0)
    for cls, files in {"b": ["x.png", "y.PNG"], "a": ["1.jpg", "2.JPEG", "3.png"]}.items():
        (root / cls).mkdir(parents=True)
        for file in files:
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / cls / file)
    (root / "a" / "notes.txt").write_text("ignored")


def test_imagefolder_loads_sorted_classes_resized_to_unit_range(tmp_path):
    write_image_tree(tmp_path)
    gray = load_imagefolder(tmp_path, image_size=16)
    assert gray.class_names == ("a", "b") and gray.y.tolist() == [0, 0, 0, 1, 1]
    assert gray.x.shape == (5, 1, 16, 16) and 0.0 <= gray.x.min() and gray.x.max() <= 1.0
    rgb = load_split(f"imagefolder:{tmp_path}", "all", image_size=8, channels=3)
    assert rgb.x.shape == (5, 3, 8, 8)
    assert EpisodeSampler(rgb, 2, 1, 1).episode(0).support_x.shape == (2, 3, 8, 8)


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_imagefolder(tmp_path / "absent")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        load_imagefolder(tmp_path / "file.png")
    with pytest.raises(DataError, match="no class subfolders"):
        load_imagefolder(tmp_path)
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataError, match="cats holds no images"):
        load_imagefolder(tmp_path)
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_imagefolder(tmp_path)
    with pytest.raises(DataError, match="channels"):
        load_imagefolder(tmp_path, channels=2)


def test_registry_names_valid_datasets_and_checks_arguments():
    with pytest.raises(DataError) as info:
        load_split("mnist", "train")
    assert all(word in str(info.value) for word in ("digits", "omniglot", "imagefolder", "SinusoidTasks"))
    assert load_split("digits", "val").class_names == ("4", "5", "6")
    with pytest.raises(DataError, match="protocols"):
        load_split("digits", "val", protocol="semi")
    with pytest.raises(DataError, match="channels"):
        load_split("digits", "val", channels=3)
    with pytest.raises(DataError, match="needs a folder"):
        load_split("imagefolder", "train")


def test_psco_protocol_has_the_supervised_classes_and_a_rotated_unlabelled_pool():
    """PsCo's protocol: each (character, rotation) of the Vinyals split is a class (4 x 423 test
    classes), and the unlabelled meta-train pool holds every rotated train image."""
    from metassl.config import load
    from metassl.registry import load_unlabelled

    psco, supervised = load_omniglot(None, "test", "psco"), load_omniglot(None, "test", "supervised")
    assert len(psco.class_names) == 4 * 423 and psco.class_names == supervised.class_names
    assert torch.equal(psco.x, supervised.x) and torch.equal(psco.y, supervised.y)
    assert psco.name == "omniglot/psco/test"
    pool = load_unlabelled(load(None, ["data.dataset=omniglot", "data.protocol=psco", "generator.kind=augment"]))
    assert pool.shape == (4 * 1028 * 20, 1, 28, 28)

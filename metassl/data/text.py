"""Labelled texts as few-shot splits with held-out classes: CLINC150 intents and JSON-lines files.

Dataset specs:

    clinc150[:PATH]   CLINC150 (Larson et al. 2019, CC BY 3.0): PATH/data_full.json (and
                      domains.json for the domain-disjoint split); without PATH, `data.root`,
                      then $METASSL_DATA/clinc150, downloaded (checked by SHA-256) when missing.
    text:PATH         JSON lines, one `{"text": ..., "label": ...}` per line, in either layout:
                      (a) PATH/{train,val,test}.jsonl: classes split by hand (a label in two
                          files is refused, as a class folder in two splits of an image folder);
                      (b) PATH a .jsonl file: its labels split into train/val/test classes by the
                          seeded class split of image folders (`split_fractions`, `split_seed`).

CLINC150's classes are split by `splits.json`'s rules (the README beside the data): the
primary split shuffles the 150 sorted intents with `random.Random(0)` (100 meta-train, 20
meta-val, 30 meta-test); `domain_disjoint` shuffles the 10 sorted domains the same way (7
domains meta-train, 1 meta-val, 2 meta-test). Meta-train episodes use an intent's `train`
utterances only; a held-out episode draws its shots from the intent's `train` utterances and
its queries from its `test` utterances (`FewShotSplit.query_only`). `oos` is never a class.

Unlabelled meta-train text (`unlabelled_texts`) is the texts of the meta-train classes with
the labels dropped; it is also what the run's vocabulary is learned from.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metassl.data.episodes import FewShotSplit
from metassl.data.imagefolder import DEFAULT_FRACTIONS, _quote, check_disjoint, check_fractions, split_class_names
from metassl.data.paths import data_home
from metassl.errors import DataError

TEXT_DATASETS = ("clinc150", "text")
CLASS_SPLITS = ("primary", "domain_disjoint")
SPLITS = ("train", "val", "test")
CLINC_COMMIT = "828f8093932c8fe6ca7936c3d2e52903b1c523de"
CLINC_URL = f"https://raw.githubusercontent.com/clinc/oos-eval/{CLINC_COMMIT}/data"
CLINC_FILES = {
    "data_full.json": "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0",
    "domains.json": "b947b579d3b8e74b06f93b01083d8efaff2888b43a3e362533bd88a6e1211b3a",
}
MAX_FILE_BYTES = 1 << 30
MAX_LABEL_CHARS = 200


@dataclass(frozen=True)
class LabelledTexts:
    """The texts of one split: `texts[i]` has class `class_names[labels[i]]`; `query_only` as FewShotSplit's."""

    texts: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    query_only: np.ndarray | None = None


@dataclass(frozen=True)
class TextCorpus:
    """Unlabelled meta-train texts and the run's tokenizer (as JSON): what text generators read.

    It crosses process boundaries (Ray actors) as plain data; `tokenizer()` rebuilds the
    tokenizer once per process.
    """

    texts: tuple[str, ...]
    tokenizer_json: str
    max_tokens: int

    def __len__(self) -> int:
        return len(self.texts)

    def tokenizer(self):
        from metassl.data.tokenizer import TextTokenizer

        cached = self.__dict__.get("_tokenizer")
        if cached is None:
            cached = TextTokenizer.from_json(self.tokenizer_json, self.max_tokens)
            object.__setattr__(self, "_tokenizer", cached)
        return cached

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}

    def __setstate__(self, state):
        self.__dict__.update(state)


def is_text(spec: str) -> bool:
    """True when the dataset spec names text (clinc150, text:PATH)."""
    return spec.partition(":")[0] in TEXT_DATASETS


def read_split(spec: str, split: str, *, root: str | None = None, class_split: str = "primary",
               split_fractions=DEFAULT_FRACTIONS, split_seed: int = 0,
               trained_on: str | None = None) -> LabelledTexts:
    """The labelled texts of `split` ("train", "val" or "test") of the text dataset `spec`.

    `trained_on` (text: only) is the source a run was meta-trained on: evaluating on another
    file or folder is evaluating on unseen classes, so none of its classes may be a meta-train
    class of the run (compared by label).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    name, _, path = spec.partition(":")
    if name == "clinc150":
        if class_split not in CLASS_SPLITS:
            raise DataError(f"data.class_split={class_split!r} is not one of {list(CLASS_SPLITS)}")
        return _clinc_split(Path(path or root).expanduser() if (path or root) else None, split, class_split)
    if name != "text":
        raise DataError(f"{spec!r} is not a text dataset; valid: clinc150[:PATH], text:PATH")
    if not path and not root:
        raise DataError("dataset 'text' needs a file or folder: use 'text:PATH'")
    source = Path(path or root).expanduser()
    if trained_on is not None and Path(trained_on).expanduser().resolve() != source.resolve():
        return _unseen(source, split, Path(trained_on).expanduser(), split_fractions, split_seed)
    return _jsonl_split(source, split, split_fractions, split_seed)


def unlabelled_texts(spec: str, **options) -> tuple[str, ...]:
    """The meta-train texts of `spec` without their labels (what self-supervised training reads)."""
    return read_split(spec, "train", **options).texts


def to_split(data: LabelledTexts, tokenizer) -> FewShotSplit:
    """`data` encoded with `tokenizer` (metassl.data.tokenizer) as a FewShotSplit of `[N, 2, L]` items."""
    return FewShotSplit(tokenizer.encode(data.texts), torch.from_numpy(data.labels.astype(np.int64)),
                        data.class_names, data.name, data.query_only)


# --- CLINC150 ----------------------------------------------------------------------------

def clinc_folder(folder: Path | None) -> Path:
    """The CLINC150 folder: `folder`, else $METASSL_DATA/clinc150 (downloaded there when missing)."""
    if folder is not None:
        if not (folder / "data_full.json").is_file():
            raise DataError(f"{folder} has no data_full.json: expected the CLINC150 files (data_full.json, "
                            f"domains.json) from {CLINC_URL}")
        return folder
    folder = data_home() / "clinc150"
    if not all((folder / f).is_file() for f in CLINC_FILES):
        download_clinc(folder)
    return folder


def download_clinc(folder: Path, base_url: str = CLINC_URL) -> Path:
    """Fetch CLINC150's data_full.json and domains.json into `folder`, checking their SHA-256."""
    import urllib.request

    from metassl.data.download import download_lock

    folder.mkdir(parents=True, exist_ok=True)
    with download_lock(folder):
        for name, digest in CLINC_FILES.items():
            target = folder / name
            if target.is_file():
                continue
            url = f"{base_url}/{name}"
            try:
                with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (a fixed https URL)
                    body = response.read(MAX_FILE_BYTES + 1)
            except OSError as e:
                raise DataError(f"CLINC150 is not in {folder} and downloading {url} failed ({e}); put "
                                "data_full.json and domains.json there, or use clinc150:PATH") from None
            if hashlib.sha256(body).hexdigest() != digest:
                raise DataError(f"{url} did not give the expected file (SHA-256 differs); nothing was saved")
            partial = target.with_suffix(".part")
            partial.write_bytes(body)
            partial.replace(target)
    return folder


def _clinc_data(folder: Path) -> dict:
    """data_full.json, checked: "train" and "test" lists of [text, intent] string pairs."""
    path = folder / "data_full.json"
    data = _read_json(path)
    for key in ("train", "test"):
        rows = data.get(key) if isinstance(data, dict) else None
        if not isinstance(rows, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(v, str) for v in r) for r in rows):
            raise DataError(f"{path}: expected {key!r} to be a list of [text, intent] string pairs, as in "
                            f"CLINC150's data_full.json")
    return data


def clinc_classes(folder: Path, class_split: str) -> dict[str, tuple[str, ...]]:
    """{"train", "val", "test": intents} of CLINC150's `class_split` (rules in the module doc)."""
    data = _clinc_data(folder)
    intents = sorted({label for _, label in data["train"]} - {"oos"})
    if len(intents) != 150:
        raise DataError(f"{folder / 'data_full.json'} has {len(intents)} intents besides 'oos'; CLINC150's class "
                        "splits are defined on its 150")
    if class_split == "primary":
        random.Random(0).shuffle(intents)
        parts = intents[:100], intents[100:120], intents[120:150]
    else:
        domains = _read_json(folder / "domains.json")
        if not isinstance(domains, dict) or len(domains) != 10 or not all(
                isinstance(v, list) and all(isinstance(i, str) for i in v) for v in domains.values()):
            raise DataError(f"{folder / 'domains.json'}: expected CLINC150's 10 domains, each a list of intents")
        listed = [i for d in sorted(domains) for i in domains[d]]
        if sorted(listed) != intents:
            raise DataError(f"{folder / 'domains.json'}: its domains must hold each of the 150 intents of "
                            "data_full.json exactly once")
        names = sorted(domains)
        random.Random(0).shuffle(names)
        parts = ([i for d in names[:7] for i in domains[d]], list(domains[names[7]]),
                 [i for d in names[8:] for i in domains[d]])
    return {split: tuple(sorted(part)) for split, part in zip(SPLITS, parts)}


def _clinc_split(folder: Path | None, split: str, class_split: str) -> LabelledTexts:
    folder = clinc_folder(folder)
    data = _clinc_data(folder)
    classes = clinc_classes(folder, class_split)[split]
    index = {c: i for i, c in enumerate(classes)}
    pairs = [(t, l, False) for t, l in data["train"] if l in index]
    if split != "train":  # held out: shots from `train` utterances, queries from `test` ones
        pairs += [(t, l, True) for t, l in data["test"] if l in index]
    return LabelledTexts(tuple(t for t, _, _ in pairs), np.array([index[l] for _, l, _ in pairs]), classes,
                         f"clinc150/{class_split}/{split}",
                         np.array([q for _, _, q in pairs], dtype=bool) if split != "train" else None)


def _read_json(path: Path):
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read as JSON ({e})") from None


# --- JSON lines --------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[tuple[str, str]]:
    """(text, label) of every line of the JSON-lines file `path`; DataError names a bad line."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read as UTF-8 text ({e})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise DataError(f'{path}, line {number}: expected {{"text": "...", "label": "..."}} with string values')
        if not row["text"].strip():
            raise DataError(f"{path}, line {number}: the text is empty")
        if not row["label"] or len(row["label"]) > MAX_LABEL_CHARS:
            raise DataError(f"{path}, line {number}: a label must have 1 to {MAX_LABEL_CHARS} characters")
        pairs.append((row["text"], row["label"]))
    if not pairs:
        raise DataError(f"{path} holds no labelled text")
    return pairs


def _layout(source: Path) -> dict[str, Path] | Path:
    if source.is_dir():
        files = {s: source / f"{s}.jsonl" for s in SPLITS}
        present = [s for s, f in files.items() if f.is_file()]
        if len(present) != len(SPLITS):
            raise DataError(f"the text folder {source} needs train.jsonl, val.jsonl and test.jsonl "
                            f"(found {present or 'none'}); or give a single .jsonl file for a seeded class split")
        return files
    if not source.is_file():
        raise DataError(f"the text dataset {source} does not exist; expected a .jsonl file or a folder with "
                        "train.jsonl, val.jsonl and test.jsonl")
    return source


def _classes_of(source: Path, split_fractions, split_seed: int) -> tuple[dict[str, tuple[str, ...]], dict]:
    """({split: class names}, {split: pairs}) of a text source in either layout."""
    layout = _layout(source)
    if isinstance(layout, dict):
        pairs = {s: read_jsonl(f) for s, f in layout.items()}
        classes = {s: tuple(sorted({l for _, l in p})) for s, p in pairs.items()}
        check_disjoint(classes, f"the text folder {source}")
        return classes, pairs
    everything = read_jsonl(layout)
    try:
        classes = split_class_names(sorted({l for _, l in everything}), check_fractions(split_fractions), split_seed)
    except DataError as err:
        raise DataError(f"the text file {source}: {err}") from None
    return classes, {s: [p for p in everything if p[1] in set(classes[s])] for s in SPLITS}


def _labelled(pairs, classes: tuple[str, ...], name: str) -> LabelledTexts:
    index = {c: i for i, c in enumerate(classes)}
    return LabelledTexts(tuple(t for t, _ in pairs), np.array([index[l] for _, l in pairs], dtype=np.int64),
                         classes, name)


def _jsonl_split(source: Path, split: str, split_fractions, split_seed: int) -> LabelledTexts:
    classes, pairs = _classes_of(source, split_fractions, split_seed)
    return _labelled(pairs[split], classes[split], f"text/{source.name}:{split}")


def _unseen(source: Path, split: str, trained_on: Path, split_fractions, split_seed: int) -> LabelledTexts:
    """A split of another text source than the run's: its `split` part (layout a) or all of it (layout b)."""
    layout = _layout(source)
    pairs = read_jsonl(layout[split]) if isinstance(layout, dict) else read_jsonl(layout)
    classes = tuple(sorted({l for _, l in pairs}))
    if split != "train":
        try:
            trained, _ = _classes_of(trained_on, split_fractions, split_seed)
        except DataError as err:
            raise DataError(f"cannot check that the classes of {source} were not trained on: the run's "
                            f"training text could not be read ({err})") from None
        seen = sorted(set(classes) & set(trained["train"]))
        if seen:
            raise DataError(f"{len(seen)} class(es) of {source} are meta-train classes of the run (trained on "
                            f"{trained_on}): {_quote(seen)}; evaluate on classes the run did not train on")
    return _labelled(pairs, classes, f"text/{source.name}:{split if isinstance(layout, dict) else 'all'}")

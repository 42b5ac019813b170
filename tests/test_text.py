"""Texts: CLINC150 and JSON-lines data, the WordPiece tokenizer, masked-language modelling, SMLMT
masked-word episodes, the Transformer backbone and text runs (resume, Parquet, several workers)."""
import json
import random

import numpy as np
import pytest
import torch

from metassl import checkpoint, config
from metassl.data.text import TextCorpus, clinc_classes, read_split, to_split
from metassl.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, TextTokenizer
from metassl.errors import CheckpointError, ConfigError, DataError
from metassl.trainer import run_local

TOPICS = {
    "weather": ["rain", "sunny", "forecast", "umbrella", "cloudy"],
    "banking": ["balance", "deposit", "account", "transfer", "savings"],
    "travel": ["flight", "hotel", "passport", "luggage", "airport"],
    "music": ["song", "playlist", "album", "guitar", "concert"],
    "food": ["recipe", "dinner", "pizza", "restaurant", "salad"],
    "health": ["doctor", "fever", "medicine", "appointment", "pharmacy"],
    "sports": ["football", "score", "match", "tennis", "stadium"],
    "movies": ["film", "actor", "cinema", "ticket", "trailer"],
    "cars": ["engine", "tires", "garage", "fuel", "brakes"],
    "school": ["homework", "teacher", "exam", "lesson", "grades"],
    "shopping": ["cart", "discount", "order", "delivery", "refund"],
    "pets": ["dog", "kitten", "vet", "leash", "puppy"],
}
FRAMES = ["please tell me about the {a} and the {b}", "what is my {a} today", "can you check the {a} for {b}",
          "i need help with {a}", "is the {b} near the {a}", "show the {a} and {b} now"]


def write_jsonl(path, per_class: int = 24, seed: int = 0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for label, words in TOPICS.items():
            for _ in range(per_class):
                a, b = rng.sample(words, 2)
                f.write(json.dumps({"text": rng.choice(FRAMES).format(a=a, b=b), "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("text") / "topics.jsonl")


def text_cfg(corpus_file, *extra):
    return config.load(None, [
        f"data.dataset=text:{corpus_file}", "data.split_fractions=[0.5,0.25,0.25]", "data.vocab_size=200",
        "data.max_tokens=16", "model.backbone=transformer", "model.hidden=16", "model.heads=2", "model.layers=1",
        "model.dropout=0.0", "learner.name=protonet", "episodes.n_way=3", "episodes.k_shot=1",
        "episodes.n_query=2", "episodes.meta_batch=4", "generator.kind=smlmt", "generator.actors=0",
        "generator.smlmt.skip_top=3", "generator.smlmt.ssl_texts=4", "generator.ssl_views=true",
        "objective.ssl_weight=0.5", "train.steps=4", "train.log_every=1", "train.val_every=2",
        "train.val_episodes=4", "train.checkpoint_every=1", "eval.episodes=8", "eval.n_query=3", *extra])


def _quiet(*_):
    pass


# --- data and tokenizer ------------------------------------------------------------------

def test_a_tokenizer_saved_and_reloaded_gives_identical_ids(corpus_file, tmp_path):
    texts = read_split(f"text:{corpus_file}", "train", split_fractions=(0.5, 0.25, 0.25)).texts
    tok = TextTokenizer.train(texts, vocab_size=200, max_tokens=16)
    tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(tmp_path / "tokenizer.json", max_tokens=16)
    unseen = ["Zebras juggle quantum marmalade!", "what is my balance today", " ".join(["balance"] * 40)]
    for batch in (list(texts[:50]), unseen):
        a, b = tok.encode(batch), again.encode(batch)
        assert a.dtype == torch.int64 and a.shape == (len(batch), 2, 16) and torch.equal(a, b)
    items = tok.encode(unseen)
    assert (items[:, 0, 0] == CLS_ID).all() and (items[:, 0][items[:, 1] == 0] == PAD_ID).all()
    assert tok.truncated >= 1  # the 40-word text is cut to 16 ids, [SEP] last
    assert items[2, 0, -1] == SEP_ID and items[2, 1].all()


@pytest.mark.parametrize("bad, match", [("", "empty"), ("   ", "empty"), ("a" * 10_001, "at most"),
                                        (None, "not a string"), ("\u200b", "no token")])
def test_empty_overlong_or_non_text_items_are_refused_with_their_position(corpus_file, bad, match):
    tok = TextTokenizer.train(["hello world", "good morning"], vocab_size=100, max_tokens=8)
    with pytest.raises(DataError, match=f"text 1 .*{match}|text 1 is .*{match}"):
        tok.encode(["fine text", bad])


def test_a_damaged_tokenizer_file_is_refused(tmp_path):
    (tmp_path / "t.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="not a tokenizer"):
        TextTokenizer.load(tmp_path / "t.json", 16)


def test_clinc150_class_splits_follow_the_published_rules():
    from conftest import shared_data

    root = shared_data()
    if root is None or not (root / "clinc150").is_dir():
        pytest.skip("shared CLINC150 data not found: set METASSL_SHARED_DATA to the folder holding clinc150/")
    folder = root / "clinc150"
    published = json.loads((folder / "splits.json").read_text())
    for name, ref in (("primary", published), ("domain_disjoint", published["alternative_domain_disjoint_seed0"])):
        classes = clinc_classes(folder, name)
        assert {s: list(v) for s, v in classes.items()} == {s: sorted(ref[f"meta_{s}"]) for s in ("train", "val", "test")}
    test = read_split(f"clinc150:{folder}", "test")
    assert len(test.class_names) == 30 and test.query_only.sum() == 30 * 30 and (~test.query_only).sum() == 30 * 100
    train = read_split(f"clinc150:{folder}", "train")
    assert train.query_only is None and len(train.texts) == 100 * 100  # `train` utterances only


def test_held_out_text_episodes_take_shots_from_the_support_pool_and_queries_from_the_query_pool():
    from metassl.data.episodes import EpisodeSampler, FewShotSplit

    x = torch.arange(40).view(40, 1, 1).repeat(1, 2, 3)
    y = torch.arange(4).repeat_interleave(10)
    query_only = np.tile(np.arange(10) >= 6, 4)
    split = FewShotSplit(x, y, ("a", "b", "c", "d"), "t", query_only)
    sampler = EpisodeSampler(split, 3, 2, 3, seed=0)
    for i in range(20):
        _, support, query = sampler.episode_indices(i)
        assert not query_only[support].any() and query_only[query].all()
    with pytest.raises(DataError, match="n_query=5 .* only 4 query examples"):
        EpisodeSampler(split, 3, 2, 5)


def test_text_folders_follow_the_held_out_class_rules(corpus_file, tmp_path):
    folder = tmp_path / "hand"
    folder.mkdir()
    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    for split, labels in (("train", ["weather", "banking"]), ("val", ["travel"]), ("test", ["banking"])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] in labels))
    with pytest.raises(DataError, match="in both train and test: 'banking'"):
        read_split(f"text:{folder}", "train")
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] == "music"))
    assert read_split(f"text:{folder}", "test").class_names == ("music",)
    # evaluating a run trained on corpus_file on another file: its classes must be unseen
    trained = set(read_split(f"text:{corpus_file}", "train", split_fractions=(0.5, 0.25, 0.25)).class_names)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] in trained))
    with pytest.raises(DataError, match="meta-train classes of the run"):
        read_split(f"text:{other}", "test", trained_on=str(corpus_file), split_fractions=(0.5, 0.25, 0.25))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "label": "a"}\n{"text": 3, "label": "b"}\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2"):
        read_split(f"text:{tmp_path / 'bad.jsonl'}", "train")


# --- masked-language modelling and SMLMT -------------------------------------------------

def test_mlm_masks_fifteen_percent_of_real_pieces_in_bert_proportions_and_never_padding():
    from metassl.ssl.masking import IGNORE, mlm_view

    g = torch.Generator().manual_seed(0)
    n, length, vocab = 4000, 24, 500
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (n, length), generator=g) * mask
    ids[:, 0] = CLS_ID
    ids[torch.arange(n), lengths - 1] = SEP_ID
    items = torch.stack([ids, mask], 1)
    masked, targets = mlm_view(items, 0.15, vocab, g)
    picked = targets != IGNORE
    real = mask.bool() & (ids != CLS_ID) & (ids != SEP_ID)
    assert not (picked & ~real).any()  # never padding, [CLS] or [SEP]
    assert torch.equal(masked[:, 1], mask) and torch.equal(targets[picked], ids[picked])
    assert torch.equal(masked[:, 0][~picked], ids[~picked])  # nothing else changes
    share = picked.sum() / real.sum()
    assert abs(float(share) - 0.15) < 0.01, share
    new = masked[:, 0][picked]
    as_mask, kept = (new == MASK_ID).float().mean(), (new == ids[picked]).float().mean()
    assert abs(float(as_mask) - 0.8) < 0.02 and abs(float(kept) - 0.1 - 0.1 / vocab) < 0.02


def test_an_smlmt_label_is_recoverable_only_from_the_masked_word(corpus_file):
    from metassl.generate.smlmt import SMLMTEpisodes
    from metassl.registry import load_unlabelled

    cfg = text_cfg(corpus_file)
    corpus = load_unlabelled(cfg)
    assert isinstance(corpus, TextCorpus) and len(corpus) == 6 * 24  # the train classes' texts, no labels
    source = SMLMTEpisodes(corpus, 3, 2, 3, cfg.generator.smlmt, seed=5, ssl_views=True)
    tok = corpus.tokenizer()
    texts = {tuple(tok.words(t)) for t in corpus.texts}
    for i in range(10):
        record = source.record(i)
        e = record.episode
        words = source.word_of(i)
        assert len(set(words)) == 3 and record.generator == "smlmt"
        for x, label in zip(torch.cat([e.support_x, e.query_x]), torch.cat([e.support_y, e.query_y])):
            assert (x[0] == MASK_ID).sum() >= 1
            shown = tok.decode(x[0]).split()
            assert words[label] not in shown  # hidden wherever it occurs
            restored = tuple(words[label] if w == "[MASK]" else w for w in shown)
            assert restored in texts  # and putting the word back gives a corpus sentence
        assert torch.equal(source.record(i).episode.query_x, e.query_x)  # a function of (seed, i)
        assert record.ssl_x1.shape == (4, 2, 16) and record.rot_y.shape == (4, 16)
    assert not torch.equal(source.record(0).episode.support_x, source.record(1).episode.support_x)


def test_smlmt_refuses_a_corpus_without_enough_words(corpus_file):
    from metassl.config import SmlmtConfig
    from metassl.generate.smlmt import SMLMTEpisodes

    tok = TextTokenizer.train(["a b c", "d e f"], 100, 8)
    corpus = TextCorpus(("the cat sat", "the dog ran"), tok.to_json(), 8)
    with pytest.raises(DataError, match="fewer than n_way=2"):
        SMLMTEpisodes(corpus, 2, 1, 1, SmlmtConfig(skip_top=0))


def test_text_episodes_round_trip_through_parquet_bit_for_bit(corpus_file, tmp_path):
    from test_shards import assert_same

    from metassl.generate.schema import from_record_batch, to_record_batch
    from metassl.generate.shards import ShardEpisodes, ShardWriter
    from metassl.generate.smlmt import SMLMTEpisodes
    from metassl.registry import load_unlabelled

    cfg = text_cfg(corpus_file)
    source = SMLMTEpisodes(load_unlabelled(cfg), 3, 2, 3, cfg.generator.smlmt, seed=1, ssl_views=True)
    records = [source.record(i) for i in range(6)]
    for got, want in zip(from_record_batch(to_record_batch(records)), records):
        assert_same(got, want)
    with ShardWriter(str(tmp_path / "shards"), episodes_per_shard=4) as writer:
        writer.write(records)
    shards = ShardEpisodes(str(tmp_path / "shards"))
    for i, want in enumerate(records):
        assert_same(shards.record(i), want)


# --- the backbone and text runs -----------------------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "attention", "first_last"])
def test_the_transformer_ignores_padding(pooling):
    from metassl.models.transformer import TextTransformer

    torch.manual_seed(0)
    model = TextTransformer(vocab_size=50, max_tokens=12, hidden=16, layers=2, heads=2, dropout=0.0,
                            pooling=pooling).eval()
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    short = torch.stack([ids, mask], 1)
    longer = torch.stack([torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1),
                          torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], 1)], 1)
    junk = short.clone()
    junk[0, 0, 5:] = 42  # other ids behind a zero attention mask
    out = model(short)
    assert out.shape == (1, 32 if pooling == "first_last" else 16)
    assert torch.allclose(out, model(longer), atol=1e-5) and torch.allclose(out, model(junk), atol=1e-5)


def test_text_configs_are_checked():
    with pytest.raises(ConfigError, match="needs model.backbone='transformer'"):
        config.load(None, ["data.dataset=clinc150"])
    with pytest.raises(ConfigError, match="not text"):
        config.load(None, ["generator.kind=smlmt"])
    with pytest.raises(ConfigError, match="for text use 'smlmt'"):
        config.load(None, ["data.dataset=clinc150", "model.backbone=transformer", "generator.kind=augment"])
    with pytest.raises(ConfigError, match="multiple of model.heads"):
        config.load(None, ["data.dataset=clinc150", "model.backbone=transformer", "model.hidden=30"])
    with pytest.raises(ConfigError, match="data.class_split"):
        config.load(None, ["data.dataset=clinc150", "model.backbone=transformer", "data.class_split=random"])


def test_a_text_run_learns_its_vocabulary_once_resumes_and_evaluates_with_it(corpus_file, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    result = run_local(text_cfg(corpus_file), whole, log=_quiet)
    assert result["test"]["protocol"]["split"] == "test" and 0 <= result["test"]["mean"] <= 1
    saved = config.load(whole / "config.yaml")
    assert saved.data.tokenizer == str((whole / "tokenizer.json").resolve())
    run_local(text_cfg(corpus_file, "train.steps=2"), split, log=_quiet)
    vocabulary = (split / "tokenizer.json").read_text()
    lines = []
    run_local(text_cfg(corpus_file), split, log=lines.append)
    assert any("resuming" in line and "step 2" in line for line in lines)
    assert (split / "tokenizer.json").read_text() == vocabulary  # learned once, reused
    # the two runs learned their vocabularies separately (not reproducible across processes), so
    # compare the resumed run with an uninterrupted one that reads the same vocabulary
    again = tmp_path / "again"
    run_local(text_cfg(corpus_file, f"data.tokenizer={split / 'tokenizer.json'}"), again, log=_quiet)
    a = checkpoint.load(checkpoint.step_path(split, 4))
    b = checkpoint.load(checkpoint.step_path(again, 4))
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert "Generated episodes" in (whole / "report.md").read_text()


@pytest.mark.usefixtures("ray_session")
def test_two_ray_workers_equal_one_process_on_text(corpus_file, tmp_path):
    from metassl.raytrain import run_ray

    one = text_cfg(corpus_file, "train.steps=3")
    run_local(one, tmp_path / "one", log=_quiet)
    shared = f"data.tokenizer={tmp_path / 'one' / 'tokenizer.json'}"
    run_ray(text_cfg(corpus_file, "train.steps=3", shared, "generator.actors=1"), tmp_path / "two", workers=2,
            log=_quiet)
    a = checkpoint.load(checkpoint.step_path(tmp_path / "one", 3))["params"]
    b = checkpoint.load(checkpoint.step_path(tmp_path / "two", 3))["params"]
    c = checkpoint.load(checkpoint.step_path(tmp_path / "one", 1))["params"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4  # the comparison can fail


@pytest.mark.usefixtures("ray_session")
def test_a_text_sweep_shares_one_vocabulary_and_its_best_config_names_it(corpus_file, tmp_path):
    from metassl.tune import run_tune

    # one trial keeps the test short; every trial's vocabulary is staged the same way
    cfg = text_cfg(corpus_file, "train.steps=2", "tune.samples=1", "tune.concurrent=1",
                   "tune.space={optim.outer_lr: {grid: [0.001]}}")
    summary = run_tune(cfg, tmp_path / "sweep", log=_quiet)
    vocabulary = (tmp_path / "sweep" / "tokenizer.json").read_text()
    trials = list((tmp_path / "sweep" / "runs").iterdir())
    assert len(trials) == 1 and summary["trials"] == 1
    for trial in trials:  # the trial copied the sweep's vocabulary rather than learning its own
        assert (trial / "tokenizer.json").read_text() == vocabulary
    best = config.load(tmp_path / "sweep" / "best.yaml")
    assert best.data.tokenizer == str((tmp_path / "sweep" / "tokenizer.json").resolve())
    assert summary["test"]["protocol"]["split"] == "test"


def test_generated_text_shards_carry_their_vocabulary_and_train_a_run(corpus_file, tmp_path):
    from metassl.cli import main

    cfg_file = tmp_path / "text.yaml"
    config.dump(text_cfg(corpus_file, "train.steps=2"), cfg_file)
    shards = tmp_path / "shards"
    assert main(["generate", str(cfg_file), "--out", str(shards), "--episodes", "8",
                 "--episodes-per-shard", "4"]) == 0
    assert (shards / "tokenizer.json").is_file()
    run = tmp_path / "run"
    run_local(text_cfg(corpus_file, "train.steps=2", f"generator.shards={shards}"), run, log=_quiet)
    assert config.load(run / "config.yaml").data.tokenizer == str((run / "tokenizer.json").resolve())
    assert (run / "tokenizer.json").read_text() == (shards / "tokenizer.json").read_text()
    assert json.loads((run / "tokenizer_source.json").read_text())["file"] == str((shards / "tokenizer.json").resolve())
    (shards / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="write the shards again"):
        run_local(text_cfg(corpus_file, "train.steps=2", f"generator.shards={shards}"), tmp_path / "r2", log=_quiet)


def test_a_moved_text_run_evaluates_with_the_vocabulary_its_checkpoint_carries(corpus_file, tmp_path):
    import shutil

    from metassl.trainer import load_trained

    run_local(text_cfg(corpus_file, "train.steps=2"), tmp_path / "a", log=_quiet)
    vocabulary = (tmp_path / "a" / "tokenizer.json").read_text()
    shutil.move(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "tokenizer.json").write_text("{}")  # replaced or damaged: the checkpoint's copy is used
    cfg, *_ = load_trained(tmp_path / "b")
    assert open(cfg.data.tokenizer).read() == vocabulary
    # an older checkpoint without its vocabulary reads the tokenizer.json beside it, or says what is missing
    best = checkpoint.resolve(tmp_path / "b")
    state = checkpoint.load(best)
    del state["tokenizer"]
    checkpoint.save(best, {k: v for k, v in state.items() if k != "format"})
    (tmp_path / "b" / "tokenizer.json").write_text(vocabulary)
    assert load_trained(tmp_path / "b")[0].data.tokenizer == str(tmp_path / "b" / "tokenizer.json")
    (tmp_path / "b" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="holds no vocabulary"):
        load_trained(tmp_path / "b")


def test_the_python_api_adapts_a_text_learner_on_strings(corpus_file, tmp_path):
    import metassl

    run_local(text_cfg(corpus_file, "train.steps=2"), tmp_path / "run", log=_quiet)
    learner = metassl.load(tmp_path / "run")
    assert learner.input_shape == (2, 16)
    support = ["what is my flight today", "i need help with pasta", "show the river and lake now"]
    predict = learner.adapt(support, [0, 1, 2])
    logits = predict(["can you check the flight for airport", "is the lake near the river"])
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    encoded = learner._tokenizer.encode(support)  # items already encoded give the same outputs
    assert torch.equal(learner.adapt(encoded, torch.tensor([0, 1, 2]))(encoded), predict(support))
    with pytest.raises(DataError, match="query_x is one string"):
        predict("what is my flight today")
    with pytest.raises(DataError, match="support_x: text 1 is empty"):
        learner.adapt(["what is my flight today", "  ", "lake"], [0, 1, 2])
    with pytest.raises(DataError, match="outside the vocabulary"):
        predict(torch.full((1, 2, 16), 10_000, dtype=torch.int64))
    with pytest.raises(DataError, match="int64 items"):
        predict(torch.zeros(1, 1, 28, 28))


def test_word_dropout_views_keep_a_word_and_are_a_function_of_the_episode(corpus_file):
    import dataclasses

    from metassl.generate.smlmt import SMLMTEpisodes
    from metassl.registry import load_unlabelled

    cfg = text_cfg(corpus_file)
    corpus = load_unlabelled(cfg)
    settings = dataclasses.replace(cfg.generator.smlmt, word_dropout=0.5, ssl_texts=8)
    source = SMLMTEpisodes(corpus, 3, 1, 1, settings, seed=2, ssl_views=True)
    a, b = source.record(3), source.record(3)
    assert torch.equal(a.ssl_x1, b.ssl_x1) and torch.equal(a.ssl_x2, b.ssl_x2)
    assert not torch.equal(a.ssl_x1, a.ssl_x2)
    real = lambda x: (x[:, 1].sum(1) - 2)  # noqa: E731  word pieces besides [CLS] and [SEP]
    assert (real(a.ssl_x1) >= 1).all() and (real(a.ssl_x2) >= 1).all()
    assert (real(a.ssl_x1) <= real(a.rot_x)).all()  # views only drop words


def test_first_last_pooling_is_the_word_bag_beside_the_final_states():
    from metassl.models.transformer import TextTransformer

    torch.manual_seed(0)
    model = TextTransformer(vocab_size=50, max_tokens=8, hidden=16, layers=1, heads=2, dropout=0.0,
                            pooling="first_last").eval()
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0, 0], [2, 11, 9, 3, 0, 0, 0, 0]])
    x = torch.stack([ids, (ids != 0).long()], 1)
    out = model(x)
    first, last = out[:, :16], out[:, 16:]
    words = model.features.tokens.weight[ids]
    bag = [words[0, :5].mean(0), words[1, :4].mean(0)]  # [CLS], the word pieces and [SEP]
    for i in range(2):
        assert torch.allclose(first[i], torch.nn.functional.normalize(bag[i], dim=0) * 4, atol=1e-5)
        assert torch.allclose(last[i].norm(), torch.tensor(4.0), atol=1e-5)
        states = model.features(x, tokens=True)[i, :5 - i].mean(0)
        assert torch.allclose(last[i] / 4, torch.nn.functional.normalize(states, dim=0), atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity
    both = (cosine(first[0], first[1], dim=0) + cosine(last[0], last[1], dim=0)) / 2
    assert torch.allclose(cosine(out[0], out[1], dim=0), both, atol=1e-6)


def test_first_last_pooling_trains_with_masked_language_modelling_and_simcse(corpus_file, tmp_path):
    # the pooled text is 2 x hidden wide, a token's state hidden: the SSL heads take each its own
    result = run_local(text_cfg(corpus_file, "model.pooling=first_last", "train.steps=2", "train.val_every=0",
                                "eval.episodes=4", "generator.kind=smlmt", "generator.actors=0",
                                "generator.ssl_views=true", "objective.ssl_weight=1.0"), tmp_path, log=_quiet)
    assert result["steps"] == 2 and 0 <= result["test"]["mean"] <= 1


@pytest.mark.parametrize("learner", [
    ["learner.name=protonet"], ["learner.name=matchingnet"],
    ["learner.name=maml", "learner.head_only=true"],  # ANIL: the head adapts, the Transformer learns outside
    ["learner.name=maml", "learner.zero_head=true", "learner.head_only=true"],
    ["learner.name=fomaml"],  # the whole network adapts
    ["learner.name=maml", "learner.learn_inner_lr=true", "learner.head_only=true"],  # Meta-SGD on the head
], ids=lambda x: "+".join(v.split("=", 1)[1] for v in x))
def test_every_learner_meta_trains_the_transformer(corpus_file, tmp_path, learner):
    result = run_local(text_cfg(corpus_file, "train.steps=2", "train.val_every=0", "eval.episodes=4",
                                "learner.inner_lr=0.1", *learner), tmp_path, log=_quiet)
    assert 0 <= result["test"]["mean"] <= 1 and result["steps"] == 2


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "list of \\[text, intent\\]"), ('{"train": [["a", 1]], "test": []}', "string pairs"),
    ('{"train": [["a", "x"]], "test": [["b", "x"]]}', "1 intents"), ("{broken", "cannot be read as JSON")])
def test_a_damaged_clinc150_file_is_refused_by_name(tmp_path, content, match):
    (tmp_path / "data_full.json").write_text(content)
    with pytest.raises(DataError, match=match):
        read_split(f"clinc150:{tmp_path}", "train")


def test_a_run_directory_keeps_the_vocabulary_of_its_settings(corpus_file, tmp_path):
    from metassl.registry import tokenizer_stage

    located = tokenizer_stage(text_cfg(corpus_file), str(tmp_path))
    assert located.data.tokenizer == str((tmp_path / "tokenizer.json").resolve())
    first = (tmp_path / "tokenizer.json").read_text()
    assert tokenizer_stage(text_cfg(corpus_file), str(tmp_path)) == located  # a re-run reuses it
    assert (tmp_path / "tokenizer.json").read_text() == first
    for change in ("data.vocab_size=300", "data.split_seed=1", f"data.tokenizer={tmp_path / 'other.json'}"):
        (tmp_path / "other.json").write_text(first)
        with pytest.raises(ConfigError, match="other settings"):
            tokenizer_stage(text_cfg(corpus_file, change), str(tmp_path))
    assert (tmp_path / "tokenizer.json").read_text() == first


def test_token_ids_from_another_vocabulary_are_refused():
    from metassl.data.tokenizer import check_items

    items = torch.stack([torch.tensor([[2, 60, 3, 0]]), torch.tensor([[1, 1, 1, 0]])], 1)
    with pytest.raises(DataError, match="outside the vocabulary of 50"):
        check_items(items, 50, "shards")
    with pytest.raises(DataError, match="no token"):
        check_items(torch.zeros(1, 2, 4, dtype=torch.long), 50, "shards")
    check_items(items, 61, "shards")


def test_vectorized_maml_draws_dropout_per_task(corpus_file, tmp_path):
    result = run_local(text_cfg(corpus_file, "train.steps=2", "train.val_every=0", "eval.episodes=4",
                                "model.dropout=0.1", "learner.name=maml", "learner.head_only=true",
                                "learner.vectorize=true", "learner.inner_lr=0.1"), tmp_path, log=_quiet)
    assert result["steps"] == 2

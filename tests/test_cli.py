"""The `metassl` command line, end to end, including its errors on bad input."""
import json
import subprocess
import sys

import pytest

from metassl.cli import main

TINY = ["--backend", "local", "--set", "model.hidden=8", "--set", "train.steps=4", "--set", "train.log_every=2",
        "--set", "train.val_every=2", "--set", "train.val_episodes=10", "--set", "train.checkpoint_every=2",
        "--set", "eval.episodes=20"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "experiments/digits_protonet.yaml", "--run-dir", str(run), *TINY]) == 0
    return run


def test_train_then_eval_json(trained_run, capsys):
    assert main(["eval", str(trained_run), "--episodes", "30", "--k-shot", "5", "--n-query", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["metric"] == "accuracy" and out["episodes"] == 30
    assert out["protocol"]["k_shot"] == 5 and out["protocol"]["n_way"] == 3
    assert out["protocol"]["split"] == "test" and out["protocol"]["norm_mode"] == "non-transductive (running statistics)"
    assert 0.0 <= out["mean"] <= 1.0 and out["ci95"] > 0


def test_eval_features_flag_picks_the_embedding_view(trained_run, capsys):
    """--features l2 scores unit-length embeddings and says so; left out, the run's eval.features (raw)."""
    base = ["eval", str(trained_run), "--episodes", "30", "--json"]
    assert main(base) == 0
    raw = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(base + ["--features", "l2"]) == 0
    l2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (raw["protocol"]["features"], l2["protocol"]["features"]) == ("raw", "l2")
    from metassl.config import with_values
    from metassl.evaluation import evaluate_model
    from metassl.registry import build_learner
    from metassl.trainer import load_trained
    cfg, learner, model, params, buffers, _ = load_trained(trained_run)
    l2_cfg = with_values(cfg, {"eval.features": "l2"})
    for out, c in ((raw, cfg), (l2, l2_cfg)):  # scored on that view, not only labelled with it
        kwargs = dict(split="test", episodes=30, seed=cfg.eval.seed)
        assert out["mean"] == evaluate_model(c, build_learner(c), model, params, buffers, **kwargs).mean
    assert main(["eval", str(trained_run), "--episodes", "30", "--features", "l2"]) == 0
    assert "l2 embeddings" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(base + ["--features", "cosine"])
    assert main(base + ["--features", "l2", "--shifts", "1"]) == 0
    shifted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shifted["protocol"]["shifts"] == 1 and raw["protocol"]["shifts"] == 0
    shifted_cfg = with_values(cfg, {"eval.features": "l2", "eval.shifts": 1})
    assert shifted["mean"] == evaluate_model(shifted_cfg, build_learner(shifted_cfg), model, params, buffers,
                                             split="test", episodes=30, seed=cfg.eval.seed).mean
    assert main(base + ["--shifts", "-1"]) == 2
    assert "eval.shifts=-1 must be >= 0" in capsys.readouterr().err


def test_eval_shapes_give_each_shape_alone_from_one_embedding(trained_run, capsys, monkeypatch):
    """--shapes: one result per shape, each the single-shape `metassl eval` figure, from one embedding pass."""
    import metassl.evaluation as ev
    base = ["eval", str(trained_run), "--episodes", "30", "--json"]
    alone = []
    for extra in (["--n-way", "2", "--k-shot", "1"], ["--n-way", "3", "--k-shot", "5", "--n-query", "5"],
                  ["--n-way", "3", "--k-shot", "2", "--n-query", "4"]):
        assert main(base + extra) == 0
        alone.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    calls = []
    real = ev.embed_rows
    monkeypatch.setattr(ev, "embed_rows", lambda *a, **k: calls.append(len(a[5])) or real(*a, **k))
    assert main(base + ["--shapes", "2w1s,3w5s5q,3w2s", "--n-query", "4"]) == 0
    together = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(calls) == 1  # one backbone pass over the rows every shape draws
    assert [(r["protocol"]["n_way"], r["protocol"]["k_shot"], r["protocol"]["n_query"]) for r in together] == \
        [(2, 1, 4), (3, 5, 5), (3, 2, 4)]  # --n-query fills the shapes that give none
    alone[0] = None  # the first alone ran at the run's n_query; the same shape with 4 queries:
    assert main(base + ["--n-way", "2", "--k-shot", "1", "--n-query", "4"]) == 0
    alone[0] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for a, t in zip(alone, together):
        assert t["protocol"] == a["protocol"] and t["episodes"] == a["episodes"] == 30
        assert t["mean"] == pytest.approx(a["mean"], abs=1e-12) and t["ci95"] == pytest.approx(a["ci95"], abs=1e-12)
    assert main(["eval", str(trained_run), "--episodes", "30", "--shapes", "2w1s,3w1s"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "2-way 1-shot" in lines[-2] and "3-way 1-shot" in lines[-1]


@pytest.mark.parametrize("shapes", ["5-way", "2w0s", "2w1s,,3w1s"])
def test_eval_shapes_that_do_not_parse_are_refused(trained_run, capsys, shapes):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(trained_run), "--episodes", "5", "--shapes", shapes])
    assert exit_.value.code == 2 and "is not a shape like 5w1s" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--shapes", "2w1s", "--k-shot", "5"], "drop --n-way and --k-shot"),
    (["--shapes", "2w1s,9w1s"], "n_way=9"),
])
def test_eval_shapes_errors(trained_run, capsys, args, message):
    assert main(["eval", str(trained_run), "--episodes", "5", *args]) == 2
    assert message in capsys.readouterr().err


def test_embedded_scores_refuse_rows_they_do_not_cover(trained_run):
    import numpy as np

    import metassl.evaluation as ev
    from metassl.registry import build_sampler
    from metassl.trainer import load_trained
    cfg, learner, model, params, buffers, _ = load_trained(trained_run)
    sampler = build_sampler(cfg, "test", n_way=2, k_shot=1, n_query=3, seed=0)
    rows = ev.rows_used(sampler, 10)
    z = ev.embed_rows(learner, model, params, buffers, sampler.split.x, rows)
    full = ev.embedded_accuracies(learner, model, params, buffers, sampler, 10, embedded=(rows, z))
    assert np.array_equal(full, ev.embedded_accuracies(learner, model, params, buffers, sampler, 10))
    with pytest.raises(ValueError, match="does not cover"):
        ev.embedded_accuracies(learner, model, params, buffers, sampler, 10, embedded=(rows[1:], z[1:]))


def test_eval_is_deterministic(trained_run, capsys):
    args = ["eval", str(trained_run / "checkpoints" / "best.pt"), "--episodes", "25", "--json"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_console_script_prints_accuracy_with_ci(trained_run):
    proc = subprocess.run([sys.executable, "-m", "metassl.cli", "eval", str(trained_run), "--episodes", "20"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "+-" in proc.stdout and "20 episodes" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "experiments/digits_protonet.yaml", "--set", "data.dataset=imagefolder:/no/such/folder"],
     "/no/such/folder"),
    (["train", "experiments/digits_protonet.yaml", "--set", "episodes.n_way=5"], "n_way=5"),
    (["train", "experiments/digits_protonet.yaml", "--set", "episodes.k_shot=150", "--set", "episodes.n_query=50"],
     "k_shot + n_query"),
    (["train", "experiments/digits_protonet.yaml", "--set", "learner.name=snail"], "learner.name='snail'"),
    (["train", "missing.yaml"], "missing.yaml"),
    (["train", "experiments/digits_protonet.yaml", "--set", "data.dataset=omniglot:/no/omniglot"], "/no/omniglot"),
])
def test_bad_input_gives_clear_error_and_exit_2(args, message, capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert main([*args, "--run-dir", str(run_dir), "--backend", "local"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not run_dir.exists()  # nothing was written for a run that could not start


def test_eval_errors(trained_run, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 64)
    assert main(["eval", str(corrupt)]) == 2
    assert "corrupt.pt" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["eval", str(trained_run), "--n-way", "9"]) == 2
    assert "n_way=9" in capsys.readouterr().err


def test_generate_shards_then_train_from_them(tmp_path, capsys):
    out = tmp_path / "shards"
    gen = ["--set", "generator.kind=augment", "--set", "episodes.n_query=2", "--set", "generator.actors=0"]
    assert main(["generate", "experiments/digits_protonet.yaml", "--out", str(out), "--episodes", "10",
                 "--episodes-per-shard", "4", *gen]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["episodes"] == 10 and len(manifest["shards"]) == 3
    assert main(["generate", "experiments/digits_protonet.yaml", "--out", str(out), "--episodes", "4", *gen]) == 2
    assert "manifest" in capsys.readouterr().err  # refuses to overwrite without --overwrite
    run = tmp_path / "run"
    assert main(["train", "experiments/digits_protonet.yaml", "--run-dir", str(run), *TINY,
                 "--set", f"generator.shards={out}", "--set", "episodes.n_query=2"]) == 0
    assert json.loads((run / "result.json").read_text())["steps"] == 4
    (out / "part-00001.parquet").write_bytes(b"garbage")
    assert main(["train", "experiments/digits_protonet.yaml", "--run-dir", str(tmp_path / "run2"), *TINY,
                 "--set", f"generator.shards={out}", "--set", "episodes.n_query=2"]) == 2
    assert "part-00001.parquet" in capsys.readouterr().err


def test_shards_that_do_not_fit_the_config_are_refused(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["generate", "experiments/digits_protonet.yaml", "--out", str(out), "--episodes", "4",
                 "--set", "generator.kind=augment", "--set", "episodes.n_query=2", "--set", "generator.actors=0"]) == 0
    assert main(["train", "experiments/digits_protonet.yaml", "--run-dir", str(tmp_path / "run"), *TINY,
                 "--set", f"generator.shards={out}", "--set", "episodes.n_query=3"]) == 2
    assert "2-query" in capsys.readouterr().err


def _tree(folder):
    """{relative path: (size, mtime_ns)} of everything under `folder`."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("content", [
    b"\xff\xfe\x00binary", b"a: " + b"[" * 2000 + b"]" * 2000, b"tune:\n  space: &s {x: *s}\n",
    b"name: ../../../../tmp/escaped\n", b"episodes: {meta_batch: 100000000000}\n",
    b"learner: {name: maml, inner_lr: .nan}\n", b"- not\n- a mapping\n",
])
def test_hostile_configs_exit_2_with_one_line_and_leave_an_existing_run_untouched(
        content, trained_run, tmp_path):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    before = _tree(trained_run)
    proc = subprocess.run([sys.executable, "-m", "metassl.cli", "train", str(path), "--run-dir", str(trained_run),
                           "--backend", "local"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("metassl train: error:")
    assert _tree(trained_run) == before
    assert not (tmp_path.parent / "escaped").exists()


def test_train_with_overrides_alone_trains_the_default(tmp_path, capsys):
    run = tmp_path / "default"
    assert main(["train", "--set", "train.steps=2", "--set", "model.hidden=8", "--set", "train.val_episodes=5",
                 "--set", "eval.episodes=10", "--run-dir", str(run), "--backend", "local"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert (run / "result.json").is_file()


def test_a_diverging_run_exits_2_naming_the_step(tmp_path, capsys):
    run = tmp_path / "diverge"
    code = main(["train", "experiments/digits_protonet.yaml", "--run-dir", str(run), *TINY,
                 "--set", "learner.name=maml", "--set", "learner.inner_lr=1e30"])
    err = capsys.readouterr().err
    assert code == 2 and "step 1" in err and "not finite" in err and len(err.strip().splitlines()) == 1
    assert "error" in json.loads((run / "result.json").read_text())
    assert not (run / "checkpoints" / "best.pt").exists()


@pytest.mark.parametrize("state, message", [
    ({"params": [1, 2]}, "must map names to tensors"),
    ({"params": {"w": float("nan")}}, "must map names to tensors"),
    ({"buffers": {"b": "nan"}}, "must map names to tensors"),
    ({"config": "not a mapping"}, "'config' must be a mapping"),
    ({"config": {"name": "../escape"}}, "plain name"),
    ({"step": "1"}, "'step' an integer"),
])
def test_hostile_checkpoints_are_refused_in_one_line(state, message, trained_run, tmp_path, capsys):
    import torch

    from metassl import checkpoint

    good = checkpoint.load(checkpoint.best_path(trained_run))
    path = tmp_path / "hostile.pt"
    torch.save({**good, **state}, path)
    assert main(["eval", str(path), "--episodes", "5"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_with_non_finite_weights_is_refused(trained_run, tmp_path, capsys):
    import torch

    from metassl import checkpoint

    good = checkpoint.load(checkpoint.best_path(trained_run))
    name = next(iter(good["params"]))
    good["params"][name] = torch.full_like(good["params"][name], float("nan"))
    torch.save(good, tmp_path / "nan.pt")
    assert main(["eval", str(tmp_path / "nan.pt"), "--episodes", "5"]) == 2
    assert "NaN" in capsys.readouterr().err

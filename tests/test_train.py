"""In-process meta-training: determinism, resume, checkpoints, results."""
import json

import pytest
import torch

from metassl import checkpoint, config
from metassl.errors import CheckpointError, ConfigError
from metassl.trainer import load_trained, run_local

TINY = ["model.hidden=8", "episodes.meta_batch=2", "train.log_every=1", "train.val_every=5",
        "train.val_episodes=10", "train.checkpoint_every=5", "eval.episodes=20"]


def tiny(*overrides, steps=10):
    return config.load("experiments/digits_protonet.yaml", TINY + [f"train.steps={steps}", *overrides])


def _quiet(*_):
    pass


def test_same_seed_gives_identical_losses(tmp_path):
    a = run_local(tiny(), tmp_path / "a", log=_quiet)
    b = run_local(tiny(), tmp_path / "b", log=_quiet)
    assert a["loss_history"] == b["loss_history"]
    assert len(a["loss_history"]) == 10
    c = run_local(tiny("seed=1"), tmp_path / "c", log=_quiet)
    assert c["loss_history"] != a["loss_history"]


def test_run_directory_contents(tmp_path):
    result = run_local(tiny(), tmp_path, log=_quiet)
    assert (tmp_path / "config.yaml").is_file()
    assert config.load(tmp_path / "config.yaml") == tiny()
    assert checkpoint.best_path(tmp_path).is_file()
    assert list((tmp_path / "tensorboard").iterdir())
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["test"]["metric"] == "accuracy" and saved["test"]["episodes"] == 20
    assert 0 <= saved["test"]["mean"] <= 1 and saved["test"]["protocol"]["split"] == "test"
    assert saved == json.loads(json.dumps(result))


def test_resume_reaches_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    run_local(tiny(steps=10), tmp_path / "whole", log=_quiet)
    run_local(tiny(steps=5), tmp_path / "split", log=_quiet)
    lines = []
    run_local(tiny(steps=10), tmp_path / "split", log=lines.append)
    assert any("resuming" in line and "step 5" in line for line in lines)
    assert json.loads((tmp_path / "split" / "result.json").read_text())["resumed_at"] == [5]
    a = checkpoint.load(checkpoint.step_path(tmp_path / "whole", 10))
    b = checkpoint.load(checkpoint.step_path(tmp_path / "split", 10))
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


def test_resume_refuses_a_different_experiment_and_keeps_the_old_config(tmp_path):
    run_local(tiny(steps=5), tmp_path, log=_quiet)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="optim.outer_lr"):
        run_local(tiny("optim.outer_lr=0.01", steps=5), tmp_path, log=_quiet)
    assert (tmp_path / "config.yaml").read_text() == before


def test_checkpoints_are_pruned_and_load_without_code(tmp_path):
    run_local(tiny("train.keep_checkpoints=2", steps=20), tmp_path, log=_quiet)
    kept = checkpoint.step_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_0000015.pt", "step_0000020.pt"]
    state = torch.load(kept[-1], weights_only=True)
    assert state["step"] == 20
    cfg, learner, model, params, buffers, _ = load_trained(tmp_path)
    assert cfg == tiny("train.keep_checkpoints=2", steps=20)


def test_corrupt_checkpoint_is_reported_with_its_name(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.pt"):
        checkpoint.load(bad)
    run_local(tiny(steps=5), tmp_path / "run", log=_quiet)
    best = checkpoint.best_path(tmp_path / "run")
    best.write_bytes(best.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="best.pt"):
        load_trained(tmp_path / "run")


def test_sinusoid_maml_beats_pretrained_baseline_on_a_small_budget(tmp_path):
    cfg = config.load("experiments/sinusoid_maml.yaml", [
        "train.steps=300", "train.log_every=100", "train.val_every=0", "train.checkpoint_every=300",
        "train.val_episodes=20", "train.pretrain_baseline_steps=300", "eval.episodes=50"])
    result = run_local(cfg, tmp_path, log=_quiet)
    test = result["test"]
    assert test["metric"] == "mse"
    assert test["mean"] < test["extra"]["mse_1_step"]  # ten steps help more than one
    assert test["extra"]["baseline_mse_10_step"] > test["mean"]


@pytest.mark.parametrize("learner", ["maml", "fomaml", "reptile", "protonet", "matchingnet"])
def test_each_learner_lowers_its_training_loss_on_digits(tmp_path, learner):
    extra = ["learner.inner_steps=1", "learner.eval_inner_steps=1", "model.norm=layer", "episodes.n_query=5",
             "learner.matching_scale=10", "optim.outer_lr=0.003"]
    if learner == "reptile":
        extra += ["optim.optimizer=sgd", "optim.outer_lr=1.0", "learner.inner_steps=5", "learner.inner_lr=0.05"]
    result = run_local(tiny(f"learner.name={learner}", *extra, steps=24), tmp_path, log=_quiet)
    losses = [loss for _, loss in result["loss_history"]]
    assert sum(losses[-6:]) < sum(losses[:6]), losses
    assert 0 <= result["test"]["mean"] <= 1


def test_self_improving_loop_warms_up_on_augment_episodes_then_clusters_the_network(tmp_path):
    cfg = tiny("generator.kind=cluster", "generator.encoder=model", "generator.warmup_steps=3",
               "generator.refresh_every=2", "generator.clusters=20", "generator.partitions=1",
               "generator.cluster_views=true", "generator.ssl_views=true", "objective.ssl_weight=0.5",
               "episodes.n_query=2", "train.checkpoint_every=1", "train.keep_checkpoints=10", steps=6)
    run_local(cfg, tmp_path, log=_quiet)
    versions = [(checkpoint.load(checkpoint.step_path(tmp_path, s))["encoder"] or {}).get("version")
                for s in range(1, 7)]
    assert versions == [None, None, 4, 4, 6, 6]  # published after steps 3 and 5 as version step + 1


def test_the_last_step_keeps_its_encoder_for_a_resume_without_handing_it_to_the_generators(tmp_path, monkeypatch):
    from metassl.generate.source import TrainingSource

    handed = []
    original = TrainingSource.refresh_encoder
    monkeypatch.setattr(TrainingSource, "refresh_encoder",
                        lambda self, state, version: (handed.append(version), original(self, state, version))[1])
    loop = SELF_IMPROVING + ["generator.cluster_views=true"]
    run_local(tiny(*loop, steps=5), tmp_path / "split", log=_quiet)  # refresh points: after steps 3 and 5
    assert handed == [4]  # version 6 is made after the last step, when no batch needs it
    assert checkpoint.load(checkpoint.step_path(tmp_path / "split", 5))["encoder"]["version"] == 6
    handed.clear()
    run_local(tiny(*loop, steps=7), tmp_path / "split", log=_quiet)  # the resumed run starts with version 6
    assert handed == []  # it came from the checkpoint; the next refresh point (7) is the last step again
    run_local(tiny(*loop, steps=7), tmp_path / "whole", log=_quiet)
    assert handed == [4, 6]
    split, whole = (checkpoint.load(checkpoint.step_path(tmp_path / d, 7)) for d in ("split", "whole"))
    for k, v in whole["params"].items():
        assert torch.equal(split["params"][k], v), k


SELF_IMPROVING = ["generator.kind=cluster", "generator.encoder=model", "generator.warmup_steps=3",
                  "generator.refresh_every=2", "generator.clusters=20", "generator.partitions=1",
                  "episodes.n_query=2", "train.checkpoint_every=1", "train.keep_checkpoints=10"]


def test_encoder_momentum_publishes_an_ema_of_the_network_and_resumes_with_it(tmp_path):
    loop = SELF_IMPROVING + ["generator.encoder_momentum=0.5"]
    run_local(tiny(*loop, steps=6), tmp_path / "whole", log=_quiet)
    saved = {s: checkpoint.load(checkpoint.step_path(tmp_path / "whole", s)) for s in range(1, 7)}
    for s in range(2, 7):  # after every step: ema <- m ema + (1 - m) w, buffers copied
        ema, before = saved[s]["encoder_momentum"], saved[s - 1]["encoder_momentum"]
        for k, w in saved[s]["params"].items():
            assert torch.allclose(ema["params"][k], 0.5 * before["params"][k] + 0.5 * w, rtol=0, atol=1e-6), k
        for k, b in saved[s]["buffers"].items():
            assert torch.equal(ema["buffers"][k], b), k
    published = saved[3]["encoder"]  # version 4, published after step 3: the EMA, not the last iterate
    assert published["version"] == 4
    for k, v in saved[3]["encoder_momentum"]["params"].items():
        assert torch.equal(published["weights"][k], v), k
    assert any(not torch.equal(published["weights"][k], v) for k, v in saved[3]["params"].items())

    for stop in (2, 3):  # resumed during the warm-up (nothing published yet) and after the first publish
        run_local(tiny(*loop, steps=stop), tmp_path / f"split{stop}", log=_quiet)
        run_local(tiny(*loop, "generator.refresh_threads=2", steps=6), tmp_path / f"split{stop}", log=_quiet)
        resumed = checkpoint.load(checkpoint.step_path(tmp_path / f"split{stop}", 6))
        for part in ("params", "buffers"):
            for k, v in saved[6][part].items():
                assert torch.equal(resumed[part][k], v), (stop, part, k)
                assert torch.equal(resumed["encoder_momentum"][part][k], saved[6]["encoder_momentum"][part][k])
        for k, v in saved[6]["encoder"]["weights"].items():
            assert torch.equal(resumed["encoder"]["weights"][k], v), (stop, k)

    state = checkpoint.load(checkpoint.step_path(tmp_path / "split3", 6))  # a checkpoint without the EMA
    state["encoder_momentum"] = None
    checkpoint.save(checkpoint.step_path(tmp_path / "split3", 6), {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(CheckpointError, match=r"step.*holds no momentum encoder for generator.encoder_momentum=0.5"):
        run_local(tiny(*loop, steps=7), tmp_path / "split3", log=_quiet)
    with pytest.raises(ConfigError, match="generator.encoder_momentum=0.9 needs the self-improving loop"):
        tiny("generator.kind=cluster", "generator.encoder_momentum=0.9")
    with pytest.raises(ConfigError, match=r"generator.encoder_momentum=1.0 must be in \[0, 1\)"):
        tiny(*SELF_IMPROVING, "generator.encoder_momentum=1.0")
    with pytest.raises(ConfigError, match=r"generator.encoder_momentum=1.5 must be in \[0, 1\)"):
        tiny("generator.encoder_momentum=1.5")
    with pytest.raises(ConfigError, match="generator.encoder_momentum=0.5 needs .* no generator.shards"):
        tiny(*SELF_IMPROVING[:2], "generator.refresh_every=2", "generator.shards=episodes/",
             "generator.encoder_momentum=0.5")


def test_warmup_needs_a_model_encoder():
    with pytest.raises(ConfigError, match="generator.warmup_steps=5 needs"):
        tiny("generator.kind=augment", "generator.warmup_steps=5")


def test_meta_sgd_learns_its_step_sizes_and_reloads(tmp_path):
    cfg = tiny("learner.name=maml", "learner.learn_inner_lr=true", "learner.inner_lr=0.1",
               "model.norm=layer", "learner.eval_inner_steps=1", steps=5)
    run_local(cfg, tmp_path, log=_quiet)
    _, learner, _, params, _, _ = load_trained(tmp_path)
    lrs = {k: v for k, v in params.items() if k.startswith("inner_lr.")}
    assert lrs and len(lrs) == len(params) // 2
    assert any(not torch.allclose(v, torch.full_like(v, 0.1)) for v in lrs.values())  # learned
    with pytest.raises(ConfigError, match="Meta-SGD"):
        tiny("learner.name=protonet", "learner.learn_inner_lr=true")


def test_meta_sgd_step_sizes_are_not_decayed():
    from metassl.trainer import make_optimizer

    named = {"w": torch.ones(3, requires_grad=True), "inner_lr.w": torch.full((3,), 0.1, requires_grad=True)}
    opt, _ = make_optimizer(tiny("optim.weight_decay=0.5", "optim.optimizer=sgd", "optim.outer_lr=0.1"), named)
    for p in named.values():
        p.grad = torch.zeros_like(p)
    opt.step()  # a zero gradient leaves only the decay term
    assert torch.allclose(named["w"], torch.full((3,), 0.95))
    assert torch.allclose(named["inner_lr.w"], torch.full((3,), 0.1))
    opt, _ = make_optimizer(tiny(), named)  # no decay: one group, as in earlier checkpoints
    assert len(opt.param_groups) == 1


def test_device_settings():
    from metassl.raytrain import _use_gpu
    from metassl.trainer import local_device

    assert local_device("cpu") == torch.device("cpu")
    assert _use_gpu("auto", workers=2, gpus=2) and not _use_gpu("auto", workers=2, gpus=1)
    assert not _use_gpu("cpu", workers=1, gpus=8)
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        _use_gpu("cuda", workers=2, gpus=1)
    if not torch.cuda.is_available():
        assert local_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            local_device("cuda")


# --- the non-finite guard ---------------------------------------------------------------------

def _poison(monkeypatch, bad_calls):
    """Make the learner's meta_step return a NaN loss on the given (1-based) calls."""
    import metassl.trainer as train_module

    real = train_module.build_learner
    calls = {"n": 0}

    def build(cfg):
        learner = real(cfg)
        step = learner.meta_step

        def meta_step(*args, **kwargs):
            calls["n"] += 1
            out = step(*args, **kwargs)
            if calls["n"] in bad_calls:
                out.loss = out.loss * float("nan")
            return out
        learner.meta_step = meta_step
        return learner
    monkeypatch.setattr(train_module, "build_learner", build)


def test_a_non_finite_step_stops_the_run_naming_the_step_and_last_checkpoint(tmp_path, monkeypatch):
    from metassl.trainer import NonFiniteError

    _poison(monkeypatch, {7})
    with pytest.raises(NonFiniteError) as err:
        run_local(tiny(), tmp_path, log=_quiet)
    message = str(err.value)
    assert "step 7" in message and "nan" in message and "step_0000005.pt" in message
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["steps"] == 6 and saved["error"] == message and "test" not in saved
    assert checkpoint.latest(tmp_path).name == "step_0000005.pt"  # nothing saved from the bad step


def test_skip_mode_finishes_counting_skipped_steps_and_changes_nothing_on_them(tmp_path, monkeypatch):
    from torch.utils.tensorboard.writer import SummaryWriter  # noqa: F401  (tensorboard is installed)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _poison(monkeypatch, {3, 4})
    result = run_local(tiny("train.on_nonfinite=skip"), tmp_path / "skip", log=_quiet)
    assert result["skipped_steps"] == 2 and result["steps"] == 10 and "test" in result
    state = checkpoint.load(checkpoint.step_path(tmp_path / "skip", 10))
    assert all(torch.isfinite(v).all() for v in [*state["params"].values(), *state["buffers"].values()])
    events = EventAccumulator(str(tmp_path / "skip" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/skipped_steps")][-1] == 2


def test_skip_mode_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    from metassl.trainer import NonFiniteError

    _poison(monkeypatch, set(range(2, 20)))
    with pytest.raises(NonFiniteError, match="step 5.*4th such step in a row"):
        run_local(tiny("train.on_nonfinite=skip", "train.max_skipped_steps=3"), tmp_path, log=_quiet)


def test_a_skipped_step_leaves_parameters_and_running_statistics_unchanged(tmp_path, monkeypatch):
    # steps 1-2 good, step 3 skipped: after step 3 the state equals the state after step 2
    _poison(monkeypatch, {3})
    run_local(tiny("train.on_nonfinite=skip", "train.checkpoint_every=1", "train.keep_checkpoints=5",
                   steps=3), tmp_path, log=_quiet)
    two, three = (checkpoint.load(checkpoint.step_path(tmp_path, s)) for s in (2, 3))
    for part in ("params", "buffers"):
        for k in two[part]:
            assert torch.equal(two[part][k], three[part][k]), (part, k)


def test_a_nan_validation_never_becomes_best(tmp_path, monkeypatch):
    import metassl.trainer as train_module

    real = train_module.evaluate_model
    calls = {"n": 0}

    def evaluate(*args, **kwargs):
        res = real(*args, **kwargs)
        if kwargs.get("split") == "val":
            calls["n"] += 1
            if calls["n"] == 2:  # the validation at step 10 is NaN
                res.mean = float("nan")
        return res
    monkeypatch.setattr(train_module, "evaluate_model", evaluate)
    result = run_local(tiny(steps=10), tmp_path, log=_quiet)
    assert result["best_step"] == 5 and result["best_val"] == result["val_history"][0][1]


def test_maml_with_batch_norm_evaluates_with_the_normalisation_it_trained_with(tmp_path):
    from metassl.evaluation import evaluate_model

    cfg = tiny("learner.name=maml", "learner.inner_lr=0.1", "model.norm=batch", steps=6)
    result = run_local(cfg, tmp_path, log=_quiet)
    assert result["test"]["protocol"]["norm_mode"] == "non-transductive (support-set statistics)"
    cfg, learner, model, params, buffers, _ = load_trained(tmp_path)
    assert buffers == {}  # no running statistics: the same normalisation in training and at test time
    kwargs = dict(split="test", episodes=20, seed=0)
    model.train()
    in_train_mode = evaluate_model(cfg, learner, model, params, buffers, **kwargs)
    model.eval()
    assert evaluate_model(cfg, learner, model, params, buffers, **kwargs).mean == in_train_mode.mean
    assert in_train_mode.mean == result["test"]["mean"] or cfg.eval.episodes != 20


@pytest.mark.parametrize("learner,norm,once", [("protonet", "batch", True), ("matchingnet", "layer", True),
                                               ("protonet", "batch_transductive", False),
                                               ("maml", "layer", False)])
def test_embedding_each_item_once_scores_the_same_episodes(tmp_path, monkeypatch, learner, norm, once):
    """eval.embed_once: metric learners with a per-item backbone embed each row once; the
    accuracies equal one backbone pass per episode. Transductive BatchNorm and MAML are not
    eligible and keep the per-episode pass."""
    import dataclasses

    import numpy as np

    import metassl.evaluation as ev
    from metassl.registry import build_sampler

    cfg = tiny(f"learner.name={learner}", f"model.norm={norm}", "learner.inner_lr=0.1", steps=5)
    run_local(cfg, tmp_path, log=_quiet)
    cfg, learner_, model, params, buffers, _ = load_trained(tmp_path)
    sampler = build_sampler(cfg, "test", n_way=3, k_shot=2, n_query=5, seed=4)
    assert ev.embeds_once(cfg, learner_, sampler) is once
    calls = {"once": 0}
    real = ev.embedded_accuracies

    def counted(*args, **kwargs):
        calls["once"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(ev, "embedded_accuracies", counted)
    kwargs = dict(split="test", episodes=60, seed=4, n_way=3, k_shot=2, n_query=5, sampler=sampler)
    default = ev.evaluate_model(cfg, learner_, model, params, buffers, **kwargs)
    assert calls["once"] == int(once)
    per_episode_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, embed_once=False))
    per_episode = ev.evaluate_model(per_episode_cfg, learner_, model, params, buffers, **kwargs)
    assert calls["once"] == int(once)
    if once:
        accs = ev.embedded_accuracies(learner_, model, params, buffers, sampler, 60, chunk=7)
        reference = ev.episode_accuracies(learner_, model, params, buffers, sampler, 60)
        assert np.sum(accs != reference) <= 1  # float rounding may flip a near tie, nothing more
        assert 0.2 < reference.mean() < 1.0  # a trained network, not chance or a constant
    assert abs(default.mean - per_episode.mean) <= 1 / (60 * 15)


def test_training_precision_is_fp32_by_default_and_auto_picks_bf16_only_for_metric_image_runs(monkeypatch):
    import metassl.trainer as tr

    cpu = torch.device("cpu")
    for units in (True, False):
        monkeypatch.setattr(tr, "has_bf16_units", lambda device, units=units: units)
        assert tr.training_precision(tiny(), cpu) == "fp32"  # the default
        auto = "train.precision=auto"
        assert tr.training_precision(tiny(auto), cpu) == ("bf16" if units else "fp32")  # ProtoNet on images
        assert tr.training_precision(tiny(auto, "learner.name=matchingnet"), cpu) == ("bf16" if units else "fp32")
        assert tr.training_precision(tiny(auto, "learner.name=maml"), cpu) == "fp32"  # inner loop: not measured
        assert tr.training_precision(tiny("train.precision=fp32"), cpu) == "fp32"
        assert tr.training_precision(tiny("learner.name=maml", "train.precision=bf16"), cpu) == "bf16"
    with pytest.raises(ConfigError, match="train.precision"):
        tiny("train.precision=fp16")


def test_a_bf16_run_trains_under_autocast_and_records_it(tmp_path):
    SSL = ["generator.kind=augment", "generator.ssl_views=true", "objective.ssl_weight=0.1"]
    fp32 = run_local(tiny("train.precision=fp32", *SSL, steps=4), tmp_path / "fp32", log=_quiet)
    bf16 = run_local(tiny("train.precision=bf16", *SSL, steps=4), tmp_path / "bf16", log=_quiet)
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    a, b = (torch.tensor([loss for _, loss in r["loss_history"]]) for r in (fp32, bf16))
    assert torch.isfinite(b).all() and not torch.equal(a, b)  # reduced precision changed the numbers...
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)  # ...but not the training
    state = checkpoint.load(checkpoint.best_path(tmp_path / "bf16"))
    assert all(v.dtype == torch.float32 for part in ("params", "buffers", "head_params")
               for v in state[part].values() if v.is_floating_point())  # weights and statistics stay fp32


def test_l2_features_change_the_test_view_only_and_every_eval_path_agrees(tmp_path):
    """eval.features=l2: ProtoNet compares unit-length embeddings at test time (the embed-once
    path, the per-episode path and `predict` alike, each equal to normalising by hand), while
    training's loss is the raw one; result protocols record the view; inner-loop learners refuse it."""
    import numpy as np
    import torch.nn.functional as F

    import metassl.evaluation as ev
    from metassl.api import evaluate
    from metassl.meta.metric import embed_episodes
    from metassl.meta.protonet import prototypes, squared_distances
    from metassl.registry import build_learner, build_sampler

    run_local(tiny("model.norm=batch", steps=5), tmp_path, log=_quiet)
    cfg, raw, model, params, buffers, _ = load_trained(tmp_path)
    l2_cfg = config.with_values(cfg, {"eval.features": "l2"})
    l2 = build_learner(l2_cfg)
    assert (raw.eval_features, l2.eval_features) == ("raw", "l2")
    sampler = build_sampler(cfg, "test", n_way=3, k_shot=2, n_query=5, seed=4)
    model.eval()
    for i in range(3):
        ep = sampler.episode(i)
        support, query = embed_episodes(model, params, buffers, ep)
        support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        by_hand = -squared_distances(query, prototypes(support, ep.support_y[None]))[0]
        torch.testing.assert_close(l2.predict(model, params, buffers, ep), by_hand)
        batch = sampler.batch(i, 2)
        assert raw.meta_step(model, params, buffers, batch).loss == l2.meta_step(model, params, buffers, batch).loss
    once = ev.embedded_accuracies(l2, model, params, buffers, sampler, 60)
    per_episode = ev.episode_accuracies(l2, model, params, buffers, sampler, 60)
    assert np.sum(once != per_episode) <= 1  # float rounding may flip a near tie, nothing more
    raw_once = ev.embedded_accuracies(raw, model, params, buffers, sampler, 60)
    assert (once != raw_once).any()  # the view changes some episodes' predictions
    kwargs = dict(split="test", episodes=60, seed=4, n_way=3, k_shot=2, n_query=5)
    res = ev.evaluate_model(l2_cfg, l2, model, params, buffers, **kwargs)
    assert res.protocol["features"] == "l2" and "l2 embeddings" in res.summary()
    assert res.mean == pytest.approx(once.mean(), abs=1 / (60 * 15))
    via_api = evaluate(tmp_path, features="l2", **kwargs)
    assert via_api.mean == res.mean and via_api.protocol["features"] == "l2"
    as_run = evaluate(tmp_path, **kwargs)
    assert as_run.protocol["features"] == "raw" and as_run.mean == pytest.approx(raw_once.mean(), abs=1 / (60 * 15))
    with pytest.raises(ConfigError, match="features='cosine' is not one of"):
        evaluate(tmp_path, features="cosine", **kwargs)
    for other in ("maml", "reptile", "matchingnet"):
        with pytest.raises(ConfigError, match=f"eval.features='l2' applies to ProtoNet's embeddings; learner.name='{other}'"):
            tiny(f"learner.name={other}", "eval.features=l2")


def test_a_run_trained_with_l2_features_validates_and_predicts_on_them_and_resumes_only_so(tmp_path):
    """A run whose config says eval.features=l2 validates, evaluates and predicts (the API) on
    unit-length embeddings; resuming it with another view, or another validation shape, is refused."""
    import torch.nn.functional as F

    import metassl
    from metassl.meta.metric import embed_episodes
    from metassl.meta.protonet import prototypes, squared_distances
    from metassl.registry import build_sampler

    run_local(tiny("eval.features=l2", steps=5), tmp_path, log=_quiet)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["test"]["protocol"]["features"] == "l2"
    trained = metassl.load(tmp_path)
    assert trained.learner.eval_features == "l2"
    cfg = trained.config
    ep = build_sampler(cfg, "test", n_way=3, k_shot=2, n_query=4, seed=1).episode(0)
    support, query = embed_episodes(trained.model, trained.params, trained.buffers, ep)
    by_hand = -squared_distances(F.normalize(query, dim=-1), prototypes(F.normalize(support, dim=-1), ep.support_y[None]))[0]
    torch.testing.assert_close(trained.adapt(ep.support_x, ep.support_y)(ep.query_x), by_hand)
    before = (tmp_path / "config.yaml").read_text()
    for change in ("eval.features=raw", "eval.seed=3", "train.val_episodes=11"):
        with pytest.raises(ConfigError, match=change.split("=")[0]):
            run_local(tiny("eval.features=l2", change, steps=8), tmp_path, log=_quiet)
    assert (tmp_path / "config.yaml").read_text() == before
    # the test episodes and the test-time shifts may change: validation uses neither
    run_local(tiny("eval.features=l2", "eval.episodes=21", "eval.shifts=1", steps=8), tmp_path, log=_quiet)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["test"]["protocol"]["shifts"] == 1 and result["test"]["episodes"] == 21


def test_validation_ranks_checkpoints_without_the_test_time_shifts(tmp_path):
    """eval.shifts leaves validation (and so best.pt) as without it: the same meta-val history;
    only the final evaluation averages over shifts."""
    plain = run_local(tiny("eval.features=l2", steps=6), tmp_path / "plain", log=_quiet)
    shifted = run_local(tiny("eval.features=l2", "eval.shifts=1", steps=6), tmp_path / "shifted", log=_quiet)
    assert shifted["val_history"] == plain["val_history"] and len(plain["val_history"]) >= 2
    assert shifted["best_step"] == plain["best_step"]
    assert plain["test"]["protocol"]["shifts"] == 0 and shifted["test"]["protocol"]["shifts"] == 1


def test_shift_averaging_embeds_every_shift_of_each_image_on_its_own_and_every_eval_path_agrees(tmp_path):
    """eval.shifts=r: ProtoNet's test embedding of an image is the mean over its (2r+1)^2 shifts
    (edges replicated) of the features view; built here by indexing, independently of the padding
    code; embed-once and per-episode scoring agree; only ProtoNet on images takes it."""
    import numpy as np
    import torch.nn.functional as F

    import metassl.evaluation as ev
    from metassl.api import evaluate
    from metassl.meta.functional import forward
    from metassl.registry import build_learner, build_sampler

    run_local(tiny(steps=5), tmp_path, log=_quiet)
    cfg, raw, model, params, buffers, _ = load_trained(tmp_path)
    model.eval()
    x = build_sampler(cfg, "test", n_way=3, k_shot=2, n_query=5, seed=4).split.x[:7]
    x = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(0))  # edges that differ from their neighbours
    h, w = x.shape[-2:]
    for features in ("raw", "l2"):
        shifted = build_learner(config.with_values(cfg, {"eval.features": features, "eval.shifts": 1}))
        assert shifted.test_views == 9
        views = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                rows = torch.arange(h).add(dy).clamp(0, h - 1)
                cols = torch.arange(w).add(dx).clamp(0, w - 1)
                z = forward(model, params, buffers, x[..., rows, :][..., cols])
                views.append(F.normalize(z, dim=-1) if features == "l2" else z)
        with torch.no_grad():
            torch.testing.assert_close(shifted.test_embed(model, params, buffers, x), torch.stack(views).mean(0).detach())
            plain = raw.test_embed(model, params, buffers, x)
        torch.testing.assert_close(plain, forward(model, params, buffers, x).detach())
    l2_cfg = config.with_values(cfg, {"eval.features": "l2", "eval.shifts": 1})
    shifted = build_learner(l2_cfg)
    sampler = build_sampler(cfg, "test", n_way=3, k_shot=2, n_query=5, seed=4)
    once = ev.embedded_accuracies(shifted, model, params, buffers, sampler, 40, chunk=5)
    per_episode = ev.episode_accuracies(shifted, model, params, buffers, sampler, 40)
    assert np.sum(once != per_episode) <= 1  # float rounding may flip a near tie, nothing more
    unshifted = ev.embedded_accuracies(build_learner(config.with_values(cfg, {"eval.features": "l2"})),
                                       model, params, buffers, sampler, 40)
    assert (once != unshifted).any()
    kwargs = dict(split="test", episodes=40, seed=4, n_way=3, k_shot=2, n_query=5)
    res = evaluate(tmp_path, features="l2", shifts=1, **kwargs)
    assert res.protocol["shifts"] == 1 and "averaged over 9 shifts of up to 1 px" in res.summary()
    assert res.mean == pytest.approx(once.mean(), abs=1 / (40 * 15))
    for bad, match in ((dict(shifts=-1), "eval.shifts=-1"), (dict(shifts=9), "eval.shifts=9"),
                       (dict(shifts=True), "shifts=True")):
        with pytest.raises(ConfigError, match=match):
            evaluate(tmp_path, **bad, **kwargs)
    for other, match in ((("learner.name=maml",), "applies to ProtoNet's embeddings"),
                         (("learner.name=matchingnet",), "applies to ProtoNet's embeddings"),
                         (("model.norm=batch_transductive",), "embeds each image on its own")):
        with pytest.raises(ConfigError, match=f"eval.shifts=1 {match}"):
            tiny(*other, "eval.shifts=1")
    with pytest.raises(ConfigError, match="eval.shifts=2 shifts images"):
        config.load("experiments/clinc150_supervised.yaml", ["eval.shifts=2"])

"""In-process meta-training: determinism, resume, checkpoints, results."""
import json

import pytest
import torch

from metassl import checkpoint, config
from metassl.errors import CheckpointError, ConfigError
from metassl.train import load_trained, run_local

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
    from metassl.train import make_optimizer

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
    from metassl.train import local_device

    assert local_device("cpu") == torch.device("cpu")
    assert _use_gpu("auto", workers=2, gpus=2) and not _use_gpu("auto", workers=2, gpus=1)
    assert not _use_gpu("cpu", workers=1, gpus=8)
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        _use_gpu("cuda", workers=2, gpus=1)
    if not torch.cuda.is_available():
        assert local_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            local_device("cuda")

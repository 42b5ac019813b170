"""Generative pseudo-tasks: VAE/GAN fitting, LASIUM latent geometry, decoding on actors, checkpoints, mixtures."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from metassl import checkpoint, config
from metassl.errors import CheckpointError, ConfigError, DataError
from metassl.generate.generative import GenerativeEpisodes, MixedEpisodes, mix_kind
from metassl.generative import latent
from metassl.generative.fit import check_fits, load_generative, run_fit_local
from metassl.generative.models import decode, gan_losses, init_params, spectral_weights, vae_loss
from metassl.registry import build_generator, load_unlabelled

# digits at 28x28: 1,797 small images, enough to see a generative model learn in seconds
CFG = config.load("experiments/digits_protonet.yaml", [
    "generator.kind=generative", "generator.actors=0", "episodes.n_way=3", "episodes.k_shot=2",
    "episodes.n_query=2", "episodes.meta_batch=1", "generator.generative.steps=40",
    "generator.generative.batch_size=32", "generator.generative.hidden=8", "generator.generative.latent_dim=8",
    "generator.generative.threshold=2.0", "generator.generative.sample_every=20",
    "train.log_every=10", "train.checkpoint_every=20", "train.threads=1"])


@pytest.fixture(scope="module")
def images():
    return load_unlabelled(CFG)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A VAE fitted for 40 steps (its run directory)."""
    run = tmp_path_factory.mktemp("vae")
    run_fit_local(CFG, run, log=lambda line: None)
    return run


def _train(images, model, steps, lr):
    params, buffers = init_params(model, channels=1, image_size=28, latent_dim=8, hidden=8, seed=0)
    params = {k: v.requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr, betas=(0.5, 0.999))
    history = []
    for step in range(steps):
        noise = torch.Generator().manual_seed(step)
        x = images[torch.randint(len(images), (32,), generator=noise)]
        if model == "vae":
            loss, parts = vae_loss(params, x, noise)
            history.append(parts["neg_elbo"])
            loss.backward()
        else:
            d_loss, _, parts = gan_losses(params, buffers, x, noise)
            history.append(parts["d_loss"])
            d = [v for k, v in params.items() if k.startswith("D.")]
            for p, g in zip(d, torch.autograd.grad(d_loss, d)):
                p.grad = g
        opt.step()
        opt.zero_grad()
    return params, buffers, history


def test_vae_negative_elbo_decreases(images):
    _, _, history = _train(images, "vae", 80, 3e-3)
    assert np.mean(history[-10:]) < 0.7 * np.mean(history[:5]), history


def test_gan_discriminator_and_generator_losses_decrease(images):
    params, buffers, history = _train(images, "gan", 40, 2e-4)
    assert history[0] == pytest.approx(2.0, abs=0.3)  # hinge loss of an untrained discriminator
    assert np.mean(history[-5:]) < 0.8 * history[0], history
    # one generator step against the (now fixed) discriminator lowers the generator's loss
    g = [v for k, v in params.items() if k.startswith("G.")]
    x = images[:32]

    def g_loss():
        return gan_losses(params, dict(buffers), x, torch.Generator().manual_seed(1), update=False)[1]

    before = g_loss()
    with torch.no_grad():
        for p, grad in zip(g, torch.autograd.grad(before, g)):
            p -= 0.05 * grad / (grad.norm() + 1e-12)
    assert float(g_loss().detach()) < float(before.detach())


def test_spectral_norm_bounds_the_discriminator_weights():
    params, buffers = init_params("gan", channels=1, image_size=28, latent_dim=8, hidden=8, seed=0)
    for _ in range(30):  # power iteration converges
        weights = spectral_weights(params, buffers, update=True)
    for w in weights.values():
        assert torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("strategy", latent.STRATEGIES)
def test_latent_strategies_have_the_stated_geometry(strategy):
    rng = np.random.default_rng(0)
    for _ in range(20):
        codes, anchors = latent.task_codes(rng, strategy, 10, 6, 32, threshold=6.0, noise=0.5, interpolate=0.2)
        assert codes.shape == (10, 6, 32) and anchors.shape == (10, 32)
        between = np.linalg.norm(anchors[:, None] - anchors[None], axis=-1)
        assert between[np.triu_indices(10, 1)].min() >= 6.0
        # every instance is nearest its own anchor, and within-class spread is below between-class distance
        to_anchor = np.linalg.norm(codes[:, :, None] - anchors[None, None], axis=-1)  # [N, P, N]
        assert (to_anchor.argmin(-1) == np.arange(10)[:, None]).all()
        centres = codes.mean(1)
        spread = np.linalg.norm(codes - centres[:, None], axis=-1).mean()
        assert spread < np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(10, 1)].min()


def test_oc_moves_instances_toward_other_anchors_and_ro_toward_random_vectors():
    args = dict(threshold=6.0, noise=0.0, interpolate=0.3)
    codes, anchors = latent.task_codes(np.random.default_rng(1), "oc", 5, 4, 16, **args)
    for j in range(5):
        others = [anchors[i] for i in range(5) if i != j]
        for c in codes[j]:  # anchor + 0.3 (another anchor - anchor)
            assert any(np.allclose(c, anchors[j] + 0.3 * (o - anchors[j])) for o in others)
    codes, anchors = latent.task_codes(np.random.default_rng(1), "ro", 5, 4, 16, **args)
    rng = np.random.default_rng(1)  # the same draws: the anchors, then one random vector per instance
    assert np.array_equal(latent.far_anchors(rng, 5, 16, 6.0), anchors)
    targets = rng.standard_normal((5, 4, 16))
    np.testing.assert_allclose(codes, anchors[:, None] + 0.3 * (targets - anchors[:, None]))


def test_a_threshold_that_cannot_be_met_is_refused():
    with pytest.raises(DataError, match="threshold=100.0 is too large"):
        latent.far_anchors(np.random.default_rng(0), 5, 4, 100.0)


def test_fitted_checkpoint_round_trips_and_records_its_data(fitted):
    state = load_generative(fitted)
    assert state["kind"] == "generative" and state["step"] == 40
    assert state["data"] == {"dataset": "digits", "protocol": "supervised", "split": "train",
                             "split_fractions": [0.6, 0.2, 0.2], "split_seed": 0,
                             "images": len(load_unlabelled(CFG)), "shape": [1, 28, 28]}
    assert state["generative"]["model"] == "vae"
    result = json.loads((fitted / "result.json").read_text())
    assert result["steps"] == 40 and (fitted / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (fitted / "reconstructions.png").is_file()
    again = load_generative(fitted / "checkpoints" / "best.pt")
    assert all(torch.equal(v, again["params"][k]) for k, v in state["params"].items())
    check_fits(state, CFG)


def test_checkpoints_that_do_not_fit_are_refused(fitted, tmp_path):
    state = load_generative(fitted)
    with pytest.raises(ConfigError, match=r"makes images of shape \[1, 28, 28\].*this run's data are \[1, 32, 32\]"):
        check_fits(state, dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, image_size=32)))
    with pytest.raises(ConfigError, match=r"fitted on other images .*data.dataset: 'digits' there, 'omniglot' here"):
        check_fits(state, dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, dataset="omniglot")))
    check_fits(state, dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, split_seed=3)))  # digits: no split
    meta = tmp_path / "meta.pt"  # a meta-training checkpoint is not a generative model
    checkpoint.save(meta, {"config": config.to_dict(CFG), "params": {}, "buffers": {}, "step": 1})
    with pytest.raises(CheckpointError, match="not a fitted generative model"):
        load_generative(meta)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_generative(bad)
    with pytest.raises(CheckpointError, match="neither a run directory nor a checkpoint"):
        load_generative(tmp_path / "missing")


def test_resumed_fit_equals_an_uninterrupted_one(fitted, tmp_path):
    short = dataclasses.replace(CFG, generator=dataclasses.replace(
        CFG.generator, generative=dataclasses.replace(CFG.generator.generative, steps=20)))
    run_fit_local(short, tmp_path, log=lambda line: None)
    lines = []
    run_fit_local(CFG, tmp_path, log=lines.append)  # 40 steps: resumes at 20
    assert any("resuming the vae fit" in line and "step 20" in line for line in lines)
    a, b = load_generative(tmp_path)["params"], load_generative(fitted)["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = dataclasses.replace(CFG, generator=dataclasses.replace(
        CFG.generator, generative=dataclasses.replace(CFG.generator.generative, hidden=16)))
    with pytest.raises(ConfigError, match="hidden"):
        run_fit_local(changed, tmp_path, log=lambda line: None)


def test_generative_episodes_are_decoded_codes_and_reproducible(fitted, images):
    cfg = config.load(None, [f"{k}={v}" for k, v in {
        "data.dataset": "digits", "generator.kind": "generative", "episodes.n_way": 3, "episodes.k_shot": 2,
        "episodes.n_query": 2, "generator.generative.checkpoint": str(fitted),
        "generator.generative.threshold": 2.0, "generator.ssl_views": "true"}.items()])
    source = build_generator(cfg, images)
    assert isinstance(source, GenerativeEpisodes)
    record = source.record(5)
    assert record.generator == "generative" and record.episode.support_x.shape == (6, 1, 28, 28)
    assert record.episode.query_x.shape == (6, 1, 28, 28) and record.ssl_x1.shape == (6, 1, 28, 28)
    codes, _, _ = source.codes(5)
    params = load_generative(fitted)["params"]
    expected = decode(params, torch.from_numpy(codes.reshape(-1, 8)).float()).view(3, 4, 1, 28, 28)
    torch.testing.assert_close(record.episode.support_x, expected[:, :2].reshape(-1, 1, 28, 28))
    again = build_generator(cfg, images).record(5)
    assert torch.equal(again.episode.query_x, record.episode.query_x)
    assert not torch.equal(source.record(6).episode.support_x, record.episode.support_x)


def test_mix_weights_give_the_stated_proportions_by_episode_id():
    weights = {"cluster": 3, "generative": 1}
    kinds = [mix_kind(weights, i) for i in range(10_000)]
    assert kinds.count("generative") / len(kinds) == pytest.approx(0.25, abs=0.002)
    for start in range(0, 10_000, 500):  # every window of 100 consecutive ids, too
        window = kinds[start:start + 100]
        assert window.count("generative") == pytest.approx(25, abs=3)
    three = [mix_kind({"a": 0.5, "b": 0.3, "c": 0.2}, i) for i in range(5000)]
    assert [three.count(k) / 5000 for k in "abc"] == pytest.approx([0.5, 0.3, 0.2], abs=0.005)
    assert three == [mix_kind({"c": 0.2, "a": 0.5, "b": 0.3}, i) for i in range(5000)]  # written in any order
    assert config.load(None, ["generator.kind=mix", "generator.mix={augment: 1e-3, cluster: 1}"]).generator.mix == {
        "augment": 0.001, "cluster": 1}


def test_mixed_stream_takes_each_episode_from_its_kind(fitted, images):
    cfg = config.load(None, [f"{k}={v}" for k, v in {
        "data.dataset": "digits", "generator.kind": "mix", "generator.mix": "{augment: 0.6, generative: 0.4}",
        "episodes.n_way": 3, "episodes.k_shot": 1, "episodes.n_query": 2,
        "generator.generative.checkpoint": str(fitted), "generator.generative.threshold": 2.0}.items()])
    mixed = build_generator(cfg, images)
    assert isinstance(mixed, MixedEpisodes)
    alone = {k: build_generator(dataclasses.replace(cfg, generator=dataclasses.replace(
        cfg.generator, kind=k, mix={})), images) for k in ("augment", "generative")}
    for i in range(12):
        record = mixed.record(i)
        assert record.generator == mix_kind(cfg.generator.mix, i)
        assert torch.equal(record.episode.support_x, alone[record.generator].record(i).episode.support_x)


def test_mix_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="needs generator.mix"):
        config.load(None, ["generator.kind=mix"])
    with pytest.raises(ConfigError, match="generator.mix names 'labelled'"):
        config.load(None, ["generator.kind=mix", "generator.mix={labelled: 1}"])
    with pytest.raises(ConfigError, match=r"generator.mix.augment=-1 must be a weight > 0"):
        config.load(None, ["generator.kind=mix", "generator.mix={augment: -1}"])
    with pytest.raises(ConfigError, match="must map generator kinds to weights"):
        config.load(None, ["generator.kind=mix", "generator.mix=cluster"])
    with pytest.raises(ConfigError, match="the GAN .* has none"):
        config.load(None, ["generator.generative.model=gan", "generator.generative.decoder=gaussian"])
    with pytest.raises(ConfigError, match="set generator.kind='mix'"):
        config.load(None, ["generator.kind=augment", "generator.mix={augment: 1}"])
    with pytest.raises(ConfigError, match="checkpoint is not set"):
        build_generator(config.load(None, ["data.dataset=digits", "generator.kind=generative"]), torch.zeros(4, 1, 28, 28))


@pytest.mark.usefixtures("ray_session")
def test_actors_and_in_process_decoding_give_identical_episodes(fitted, images):
    from metassl.generate.pool import EpisodePool

    cfg = config.load(None, [f"{k}={v}" for k, v in {
        "data.dataset": "digits", "generator.kind": "generative", "episodes.n_way": 3, "episodes.k_shot": 1,
        "episodes.n_query": 2, "generator.generative.checkpoint": str(fitted), "generator.episodes_per_task": 3,
        "generator.generative.threshold": 2.0, "generator.generative.views": "true",
        "generator.ssl_views": "true"}.items()])
    reference = build_generator(cfg, images)
    pool = EpisodePool(cfg, images, actors=2)
    try:
        records = pool.records(0, 9)
    finally:
        pool.close()
    for r in records:
        expected = reference.record(r.episode_id)
        assert torch.equal(r.episode.support_x, expected.episode.support_x)
        assert torch.equal(r.episode.query_x, expected.episode.query_x)
        assert torch.equal(r.ssl_x1, expected.ssl_x1) and r.generator == "generative"


@pytest.mark.usefixtures("ray_session")
def test_fit_generative_on_two_ray_workers(tmp_path, capsys):
    from metassl.cli import main

    run = tmp_path / "gan"
    argv = ["fit-generative", "experiments/digits_protonet.yaml", "--run-dir", str(run), "--workers", "2", "--json",
            "--set", "generator.generative.model=gan", "--set", "generator.generative.steps=6",
            "--set", "generator.generative.batch_size=16", "--set", "generator.generative.hidden=8",
            "--set", "train.log_every=3", "--set", "train.checkpoint_every=3"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "gan" and summary["steps"] == 6
    state = load_generative(run)
    assert state["step"] == 6 and set(state["buffers"]) == {"D.conv1.u", "D.conv2.u", "D.fc.u"}
    assert (run / "samples.png").is_file() and not (run / "reconstructions.png").exists()
    # an odd batch cannot be shared by two workers: one line, nothing started
    assert main(argv + ["--set", "generator.generative.batch_size=15"]) == 2
    assert "batch_size=15 must be a multiple of --workers=2" in capsys.readouterr().err


def test_train_fits_the_generative_model_once_or_uses_the_one_named(fitted, tmp_path, capsys):
    from metassl.cli import main

    small = ["--backend", "local", "--set", "model.hidden=8", "--set", "train.steps=2", "--set", "train.val_every=2",
             "--set", "train.val_episodes=4", "--set", "train.checkpoint_every=2", "--set", "eval.episodes=4",
             "--set", "train.threads=1", "--set", "generator.generative.steps=3", "--set", "generator.generative.hidden=8",
             "--set", "generator.generative.latent_dim=8", "--set", "generator.generative.threshold=2",
             "--set", "data.dataset=digits", "--set", "episodes.n_way=3", "--set", "eval.n_way=3"]
    run = tmp_path / "run"
    assert main(["train", "experiments/omniglot_lasium_protonet.yaml", "--run-dir", str(run), *small]) == 0
    fit = json.loads((run / "generative" / "result.json").read_text())
    assert fit["steps"] == 3 and config.load(run / "config.yaml").generator.generative.checkpoint == str(
        run / "generative")
    assert (run / "generative_samples.png").is_file() and "generative_samples.png" in (run / "report.md").read_text()
    stamp = (run / "generative" / "result.json").stat().st_mtime_ns
    # a longer re-run resumes the meta-training and reuses the fit
    assert main(["train", "experiments/omniglot_lasium_protonet.yaml", "--run-dir", str(run), *small,
                 "--set", "train.steps=4"]) == 0
    assert (run / "generative" / "result.json").stat().st_mtime_ns == stamp
    assert json.loads((run / "result.json").read_text())["resumed_at"] == [2]
    named = tmp_path / "named"
    assert main(["train", "experiments/omniglot_lasium_protonet.yaml", "--run-dir", str(named), *small,
                 "--set", f"generator.generative.checkpoint={fitted}"]) == 0
    assert not (named / "generative").exists()
    assert main(["train", "experiments/omniglot_lasium_protonet.yaml", "--run-dir", str(tmp_path / "bad"), *small,
                 "--set", f"generator.generative.checkpoint={fitted}", "--set", "data.image_size=32"]) == 2
    assert "makes images of shape [1, 28, 28]" in capsys.readouterr().err
    # the fit in RUN/generative is reused only with the settings it was made with
    assert main(["train", "experiments/omniglot_lasium_protonet.yaml", "--run-dir", str(run), *small,
                 "--set", "train.steps=4", "--set", "generator.generative.hidden=16"]) == 2
    assert "generator.generative.hidden differ" in capsys.readouterr().err
    import shutil  # a run whose meta-training never saved a checkpoint: the fit itself refuses
    shutil.copytree(run / "generative", tmp_path / "solo" / "generative")
    assert main(["train", "experiments/omniglot_lasium_protonet.yaml", "--run-dir", str(tmp_path / "solo"), *small,
                 "--set", "generator.generative.hidden=16"]) == 2
    assert "holds a fit with different settings (hidden differ)" in capsys.readouterr().err
    # anchors that cannot be placed fail before anything is fitted
    assert main(["train", "experiments/omniglot_lasium_protonet.yaml", "--run-dir", str(tmp_path / "far"), *small,
                 "--set", "generator.generative.threshold=100"]) == 2
    assert "threshold=100.0 is too large" in capsys.readouterr().err and not (tmp_path / "far").exists()


def test_mix_with_the_self_improving_cluster_loop_keeps_encoder_versions(fitted):
    from metassl.generate.source import TrainingSource, cpu_weights, encoder_version
    from metassl.registry import build_backbone, build_learner

    cfg = config.load(None, [f"{k}={v}" for k, v in {
        "data.dataset": "digits", "generator.kind": "mix", "generator.mix": "{cluster: 0.5, generative: 0.5}",
        "generator.encoder": "model", "generator.warmup_steps": 2, "generator.refresh_every": 2,
        "generator.clusters": 10, "generator.partitions": 1, "generator.actors": 0, "episodes.n_way": 3,
        "episodes.k_shot": 1, "episodes.n_query": 2, "episodes.meta_batch": 2, "model.hidden": 8,
        "generator.generative.checkpoint": str(fitted), "generator.generative.threshold": 2.0}.items()])
    model = build_backbone(cfg, build_learner(cfg))
    weights = cpu_weights({**dict(model.named_parameters()), **dict(model.named_buffers())})
    source = TrainingSource(cfg)
    seen = []
    for step in range(5):
        if step and encoder_version(cfg, step) != encoder_version(cfg, step - 1):
            source.refresh_encoder(weights, encoder_version(cfg, step))
        batch = source.batch(step)
        seen += [(r.generator, r.encoder_version) for r in batch.records]
    assert {g for g, _ in seen} == {"cluster", "generative", "augment"}  # augment: the cluster part's warm-up
    assert [v for _, v in seen] == [encoder_version(cfg, i // 2) for i in range(10)]


def test_refit_continues_the_fit_and_decodes_the_episodes_after_each_refresh(fitted, images, tmp_path):
    from metassl.generate.source import VersionedGenerator, split_generative, with_generative
    from metassl.generative.fit import Refit
    from metassl.registry import mix_member
    from metassl.trainer import run_local

    short = dataclasses.replace(CFG, generator=dataclasses.replace(
        CFG.generator, generative=dataclasses.replace(CFG.generator.generative, steps=20)))
    run_fit_local(short, tmp_path / "short", log=lambda line: None)
    refit = Refit(load_generative(tmp_path / "short"), images)
    refit.advance(20)  # 20 steps, then 20 more: the 40-step fit exactly
    whole = load_generative(fitted)["params"]
    assert refit.step == 40 and all(torch.equal(refit.weights()[k], whole[k]) for k in whole)

    def mix(steps, *more):
        return config.load("experiments/digits_protonet.yaml", [
            "generator.kind=mix", "generator.mix={cluster: 0.5, generative: 0.5}", "generator.encoder=model",
            "generator.warmup_steps=2", "generator.refresh_every=2", "generator.clusters=10",
            "generator.partitions=1", "generator.actors=0", "episodes.n_way=3", "episodes.k_shot=1",
            "episodes.n_query=2", "episodes.meta_batch=2", "model.hidden=8", "generator.generative.threshold=2.0",
            f"generator.generative.checkpoint={tmp_path / 'short'}", "generator.generative.refit_steps=5",
            f"train.steps={steps}", "train.checkpoint_every=1", "train.keep_checkpoints=10", "train.val_every=3",
            "train.val_episodes=4", "eval.episodes=4", "train.log_every=1", "train.threads=1", *more])

    lines = []
    run_local(mix(5), tmp_path / "run", log=lines.append)
    states = [checkpoint.load(checkpoint.step_path(tmp_path / "run", s)) for s in range(1, 6)]
    # refits after steps 2 and 4 (the refresh points), 5 fit steps each, published with the encoder
    assert [s["generative_refit"]["step"] for s in states] == [20, 25, 25, 30, 30]
    assert sum("generative model refitted to fit step" in line for line in lines) == 2
    encoder, decoder = split_generative(states[3]["encoder"]["weights"])
    assert states[3]["encoder"]["version"] == 5 and "generative/" not in "".join(encoder)
    assert all(torch.equal(decoder[k], states[3]["generative_refit"]["params"][k]) for k in decoder)
    # the generative episodes after a refresh are decoded with the refitted parameters
    cfg = mix(5)
    versioned = VersionedGenerator(cfg, images)
    source = versioned.at(5, states[3]["encoder"]["weights"])
    i = next(i for i in range(20) if mix_kind(cfg.generator.mix, i) == "generative")
    expected = build_generator(mix_member(cfg, "generative"), images, generative={"params": decoder}).record(i)
    assert torch.equal(source.record(i).episode.support_x, expected.episode.support_x)
    assert not torch.equal(build_generator(cfg, images).record(i).episode.support_x, expected.episode.support_x)
    later = versioned.at(7, with_generative(encoder, None))  # a publish without a refit keeps the decoder
    assert torch.equal(later.record(i).episode.support_x, expected.episode.support_x)
    from metassl.report import write_report
    write_report(tmp_path / "run", episodes_png=False)
    assert "refitted at the refresh points" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "generative_refit_samples.png").is_file()
    # a resumed run refits from where the checkpoint left off
    run_local(mix(3), tmp_path / "split", log=lambda line: None)
    run_local(mix(5), tmp_path / "split", log=lambda line: None)
    resumed = checkpoint.load(checkpoint.step_path(tmp_path / "split", 5))
    for k in states[4]["params"]:
        assert torch.equal(resumed["params"][k], states[4]["params"][k]), k
    for k, v in states[4]["generative_refit"]["params"].items():
        assert torch.equal(resumed["generative_refit"]["params"][k], v), k


def test_refit_needs_the_self_improving_mix():
    with pytest.raises(ConfigError, match="refit_steps=5 continues the generative fit"):
        config.load("experiments/digits_protonet.yaml", ["generator.kind=generative",
                                                          "generator.generative.refit_steps=5"])

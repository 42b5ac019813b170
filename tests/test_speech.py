"""Speech runs end to end: audio pseudo-tasks, CPC in the combined objective, Ray, resume, bad files."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from metassl import checkpoint, config
from metassl.config import AudioAugmentConfig
from metassl.errors import ConfigError
from metassl.generate.augment import AugmentEpisodes
from metassl.ssl.audio_views import random_audio_views
from metassl.trainer import run_local

RATE = 8000


@pytest.fixture(scope="module")
def speech_folder(tmp_path_factory):
    """12 'words' x 6 recordings of a quarter second: each word a chirp of its own, each recording shifted,
    louder or softer and noisier."""
    root = tmp_path_factory.mktemp("speech") / "words"
    t = np.arange(RATE // 4) / RATE
    rng = np.random.default_rng(0)
    for word in range(12):
        f0, sweep = 300 + 150 * word, (-1) ** word * 2000
        for take in range(6):
            wave = np.sin(2 * np.pi * (f0 * t + 0.5 * sweep * t * t)) * rng.uniform(0.2, 0.6)
            wave = np.roll(wave, rng.integers(-200, 200)) + 0.02 * rng.standard_normal(len(t))
            (root / f"w{word:02d}").mkdir(parents=True, exist_ok=True)
            soundfile.write(str(root / f"w{word:02d}" / f"take{take}.wav"), wave.astype(np.float32), RATE)
    return root


def speech_cfg(folder, *extra, steps=3):
    return config.load(None, [
        f"data.dataset=audio:{folder}", "data.clip_seconds=0.25", "model.backbone=audio", "model.hidden=16",
        "model.context=16", "model.norm=layer", "episodes.n_way=3", "episodes.k_shot=1", "episodes.n_query=2",
        "episodes.meta_batch=2", "generator.kind=augment", "generator.ssl_views=true", "generator.actors=0",
        "generator.episodes_per_task=2", "objective.ssl_weight=1.0", "objective.simclr=0.5", "objective.cpc=1.0",
        "objective.cpc_steps=3", f"train.steps={steps}", "train.log_every=1", "train.val_every=0",
        "train.val_episodes=5", "train.checkpoint_every=1", "eval.n_way=2", "eval.episodes=10", *extra])


def _quiet(*_):
    pass


def test_audio_views_change_a_clip_and_the_identity_settings_do_not():
    clip = torch.sin(torch.arange(4000) / 8.0).view(1, 1, -1).repeat(4, 1, 1) * 0.5
    same = AudioAugmentConfig(shift=0.0, speed_min=1.0, speed_max=1.0, gain_db=0.0, noise_prob=0.0)
    assert torch.allclose(random_audio_views(clip, same, torch.Generator().manual_seed(0)), clip, atol=1e-4)
    views = random_audio_views(clip, AudioAugmentConfig(), torch.Generator().manual_seed(0))
    assert views.shape == clip.shape and float(views.abs().max()) <= 1.0
    assert all(not torch.allclose(v, clip[0], atol=1e-2) for v in views)
    louder = AudioAugmentConfig(shift=0.0, speed_min=1.0, speed_max=1.0, gain_db=6.0, noise_prob=0.0)
    ratio = random_audio_views(clip, louder, torch.Generator().manual_seed(1)).abs().amax(-1) / 0.5
    assert float(ratio.min()) >= 10 ** (-6 / 20) - 1e-4 and float(ratio.max()) <= 10 ** (6 / 20) + 1e-4
    fast = AudioAugmentConfig(shift=0.0, speed_min=1.25, speed_max=1.25, gain_db=0.0, noise_prob=0.0)
    spectrum = torch.fft.rfft(random_audio_views(clip[:1], fast, torch.Generator())[0, 0, 800:3200])
    base = torch.fft.rfft(clip[0, 0, 800:3200])
    assert math.isclose(int(spectrum.abs().argmax()) / int(base.abs().argmax()), 1.25, rel_tol=0.03)


def test_the_random_equaliser_shapes_each_clip_within_its_bound_and_keeps_earlier_views():
    from metassl.ssl.audio_views import random_equaliser

    noise = torch.randn(6, 1, 4000, generator=torch.Generator().manual_seed(0)) * 0.01
    out = random_equaliser(noise, 12.0, torch.Generator().manual_seed(1))
    gain_db = 20 * torch.log10(torch.fft.rfft(out).abs() / torch.fft.rfft(noise).abs())
    assert float(gain_db.abs().max()) <= 12.0 + 1e-3 and float(gain_db.abs().max()) > 2.0
    smooth = gain_db[..., 1:] - gain_db[..., :-1]  # a smooth curve: neighbouring bins hardly differ
    assert float(smooth.abs().max()) < 0.05
    assert not torch.allclose(gain_db[0], gain_db[1], atol=0.5)  # every clip its own filter
    assert torch.equal(out, random_equaliser(noise, 12.0, torch.Generator().manual_seed(1)))  # seeded
    clip = torch.sin(torch.arange(4000) / 8.0).view(1, 1, -1).repeat(4, 1, 1) * 0.5
    base, eq = AudioAugmentConfig(), AudioAugmentConfig(eq_db=12.0)
    first = random_audio_views(clip, base, torch.Generator().manual_seed(3))
    assert torch.equal(first, random_audio_views(clip, base, torch.Generator().manual_seed(3)))
    assert not torch.allclose(first, random_audio_views(clip, eq, torch.Generator().manual_seed(3)), atol=1e-3)
    with pytest.raises(ConfigError, match="eq_db"):
        random_audio_views(clip, AudioAugmentConfig(eq_db=-1.0), torch.Generator())


def test_audio_episodes_are_seeded_by_episode_id_and_round_trip_through_parquet(tmp_path):
    from test_shards import assert_same

    from metassl.generate.shards import ShardEpisodes, ShardWriter

    clips = torch.randn(20, 1, 2000) * 0.1
    source = AugmentEpisodes(clips, 3, 1, 2, AudioAugmentConfig(), seed=5, ssl_views=True)
    records = [source.record(i) for i in range(5)]
    again = AugmentEpisodes(clips, 3, 1, 2, AudioAugmentConfig(), seed=5, ssl_views=True)
    for i in (4, 0, 2):  # any order, any instance
        assert_same(again.record(i), records[i])
    assert not torch.equal(records[0].episode.query_x, records[1].episode.query_x)
    with ShardWriter(str(tmp_path / "shards"), episodes_per_shard=2) as writer:
        writer.write(records)
    shards = ShardEpisodes(str(tmp_path / "shards"))
    for i, want in enumerate(records):
        assert_same(shards.record(i), want)


def test_speech_configs_are_checked(speech_folder):
    with pytest.raises(ConfigError, match="objective.cpc predicts future audio frames"):
        config.load(None, ["objective.cpc=1"])
    with pytest.raises(ConfigError, match="needs model.backbone='audio'"):
        config.load(None, [f"data.dataset=audio:{speech_folder}"])
    with pytest.raises(ConfigError, match="audio episodes come from"):
        speech_cfg(speech_folder, "generator.kind=generative")
    with pytest.raises(ConfigError, match="cpc_steps=40 must be fewer than the 23 frames"):
        speech_cfg(speech_folder, "objective.cpc_steps=40")
    with pytest.raises(ConfigError, match="too short"):
        speech_cfg(speech_folder, "data.clip_seconds=0.001")
    with pytest.raises(ConfigError, match="speakers"):
        speech_cfg(speech_folder, "data.class_split=speakers")


def test_a_speech_run_trains_with_cpc_resumes_and_draws_its_episodes(speech_folder, tmp_path):
    whole = run_local(speech_cfg(speech_folder, steps=4), tmp_path / "whole", log=_quiet)
    assert 0 <= whole["test"]["mean"] <= 1 and whole["test"]["protocol"]["dataset"].startswith("audio:")
    split = tmp_path / "split"
    run_local(speech_cfg(speech_folder, steps=2), split, log=_quiet)
    lines = []
    run_local(speech_cfg(speech_folder, steps=4), split, log=lines.append)
    assert any("resuming" in line and "step 2" in line for line in lines)
    a = checkpoint.load(checkpoint.step_path(tmp_path / "whole", 4))
    b = checkpoint.load(checkpoint.step_path(split, 4))
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert a["head_params"]["cpc_predictors"].shape == (3, 16, 16)
    from metassl.report import load_run
    scalars = load_run(tmp_path / "whole").scalars
    assert any(name.endswith("cpc_loss") for name in scalars), sorted(scalars)
    assert (tmp_path / "whole" / "episodes.png").is_file()


@pytest.mark.usefixtures("ray_session")
def test_two_ray_workers_with_generator_actors_equal_one_process_with_cpc(speech_folder, tmp_path):
    from metassl.raytrain import run_ray

    run_local(speech_cfg(speech_folder), tmp_path / "one", log=_quiet)
    run_ray(speech_cfg(speech_folder, "generator.actors=1"), tmp_path / "two", workers=2, log=_quiet)
    a = checkpoint.load(checkpoint.step_path(tmp_path / "one", 3))["params"]
    b = checkpoint.load(checkpoint.step_path(tmp_path / "two", 3))["params"]
    c = checkpoint.load(checkpoint.step_path(tmp_path / "one", 1))["params"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4  # the comparison can fail


def test_a_bad_audio_file_ends_the_run_with_one_line(speech_folder, tmp_path):
    import shutil

    folder = tmp_path / "words"
    shutil.copytree(speech_folder, folder)
    for word in folder.iterdir():  # a damaged file in every class: whichever split is read first meets one
        (word / "take9.wav").write_bytes(b"RIFF....WAVEfmt " + bytes(20))
    out = subprocess.run([sys.executable, "-m", "metassl.cli", "train", "--backend", "local", "--run-dir",
                          str(tmp_path / "run"), "--set", f"data.dataset=audio:{folder}", "--set",
                          "model.backbone=audio", "--set", "generator.kind=labelled", "--set", "episodes.n_query=2",
                          "--set", "data.clip_seconds=0.25"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read the audio file" in lines[0] and "take9.wav" in lines[0], out.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the data was checked


def test_one_checkpoint_evaluates_keywords_with_any_or_disjoint_speakers_and_speaker_identity(speech_root, tmp_path):
    from metassl.api import evaluate

    cfg = config.load("experiments/speech_supervised.yaml", [
        f"data.root={speech_root}", "model.hidden=8", "model.context=8", "train.steps=2", "train.val_every=0",
        "train.val_episodes=5", "train.checkpoint_every=2", "eval.episodes=10", "episodes.n_query=2"])
    result = run_local(cfg, tmp_path / "run", log=_quiet)
    assert result["test"]["protocol"]["disjoint_groups"] == "speakers"
    assert result["test"]["protocol"]["classes"] == "arabic_speech_commands/keywords/test"
    anyone = evaluate(tmp_path / "run", episodes=10, disjoint_groups=False)
    assert "disjoint_groups" not in anyone.protocol
    # result.json holds the other protocol and speaker identification of the same checkpoint too
    assert "disjoint_groups" not in result["other_protocol"]["protocol"]
    assert result["other_protocol"]["mean"] == anyone.mean
    assert result["speaker_id"]["protocol"]["classes"] == "arabic_speech_commands/speakers/test"
    assert result["speaker_id"]["protocol"]["disjoint_groups"] == "keywords"
    assert result["speaker_id"]["mean"] == evaluate(tmp_path / "run", episodes=10, class_split="speakers").mean
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["speaker_id"] == result["speaker_id"] and saved["other_protocol"] == result["other_protocol"]
    speakers = evaluate(tmp_path / "run", episodes=10, class_split="speakers", n_way=5, k_shot=1, n_query=5)
    assert speakers.protocol["classes"] == "arabic_speech_commands/speakers/test"
    assert speakers.protocol["num_classes"] == 6 and speakers.protocol["disjoint_groups"] == "keywords"
    with pytest.raises(ConfigError, match="class_split"):
        evaluate(tmp_path / "run", class_split="bogus")
    # an extra evaluation whose episodes the split cannot fill is recorded as skipped, not fatal:
    # 16 queries are more than a half of the 10 test keywords holds for one speaker (5 x 3 clips)
    from metassl.evaluation import format_results
    from metassl.registry import build_sampler
    from metassl.trainer import group_evaluations, load_trained

    run_cfg, learner, model, _, _, state = load_trained(str(tmp_path / "run"))
    wide = config.with_values(run_cfg, {"eval.n_query": 16})
    sampler = build_sampler(wide, "test", n_way=5, k_shot=1, n_query=16, seed=0, disjoint_groups=True)
    extra = group_evaluations(wide, learner, model, state, sampler, 5, 1, 16, log=_quiet)
    assert 0 <= extra["other_protocol"]["mean"] <= 1 and "n_query=16" in extra["speaker_id"]["skipped"]
    assert any(line.startswith("speaker identification: skipped") for line in format_results({**result, **extra}))


def test_the_self_improving_loop_clusters_audio_with_the_network_being_trained(speech_folder, tmp_path):
    from metassl.generate.source import TrainingSource, cpu_weights
    from metassl.registry import build_backbone, build_learner

    cfg = speech_cfg(speech_folder, "generator.kind=cluster", "generator.encoder=model", "generator.clusters=8",
                     "generator.partitions=2", "generator.warmup_steps=2", "generator.refresh_every=2",
                     "generator.cluster_views=true", steps=6)
    source = TrainingSource(cfg)
    assert {r.generator for r in source.batch(0).records} == {"augment"}  # warm-up
    model = build_backbone(cfg, build_learner(cfg))
    source.refresh_encoder(cpu_weights({**dict(model.named_parameters()), **dict(model.named_buffers())}), 3)
    batch = source.batch(2)
    assert {r.generator for r in batch.records} == {"cluster"} and batch.encoder_versions() == [3, 3]
    assert batch.episodes.support_x.shape == (2, 3, 1, 2000)
    result = run_local(cfg, tmp_path / "run", log=_quiet)
    assert result["steps"] == 6 and 0 <= result["test"]["mean"] <= 1


def test_the_python_api_adapts_a_speech_learner_on_waveforms_at_their_own_rate(speech_folder, tmp_path):
    from metassl.api import load
    from metassl.errors import DataError

    run_local(speech_cfg(speech_folder, steps=1), tmp_path / "run", log=_quiet)
    learner = load(tmp_path / "run")
    assert learner.input_shape == (1, 2000) and learner.sample_rate == 8000
    t16 = np.arange(4000) / 16000
    low, high = np.sin(2 * np.pi * 400 * t16), np.sin(2 * np.pi * 1500 * t16)
    predictor = learner.adapt([low, high], [0, 1], sample_rate=16000)  # resampled to the model's 8 kHz
    assert predictor([high, low]).shape == (2, 2)  # queries at the rate the support set was given at
    clips8k = torch.from_numpy(np.stack([low[::2], high[::2]]).astype(np.float32)).unsqueeze(1)
    assert learner.adapt(clips8k, [0, 1])(clips8k).argmax(1).tolist() == [0, 1]
    with pytest.raises(DataError, match="below the model's data.sample_rate=8000"):
        learner.adapt([low, high], [0, 1], sample_rate=4000)
    with pytest.raises(DataError, match=r"support_x\[1\] must be a non-empty 1-D float waveform"):
        learner.adapt([low, np.zeros((2, 3))], [0, 1])
    with pytest.raises(DataError, match=r"support_x\[0\] holds NaN"):
        learner.adapt([np.full(100, np.nan), high], [0, 1])
    with pytest.raises(DataError, match=r"query_x\[0\] is silent"):
        predictor([np.zeros(4000)])


@pytest.mark.parametrize("learner", [["learner.name=maml", "learner.head_only=true"], ["learner.name=fomaml"],
                                     ["learner.name=matchingnet"]])
def test_every_kind_of_learner_meta_trains_the_audio_network(speech_folder, tmp_path, learner):
    cfg = speech_cfg(speech_folder, *learner, "model.norm=batch", "episodes.n_way=2", "learner.inner_steps=1",
                     "learner.eval_inner_steps=1", steps=2)
    result = run_local(cfg, tmp_path / "run", log=_quiet)
    assert result["steps"] == 2 and 0 <= result["test"]["mean"] <= 1
    if cfg.learner.name != "matchingnet":  # support-set statistics under an inner loop
        assert result["test"]["protocol"]["norm_mode"] == "non-transductive (support-set statistics)"


def test_the_log_mel_frontend_is_librosas_spectrogram_and_trains_with_cpc(speech_folder, tmp_path):
    librosa = pytest.importorskip("librosa")
    from metassl.models.audio import AudioEncoder

    encoder = AudioEncoder(hidden=8, context=8, frontend="logmel", kernels=(3,), strides=(1,))
    x = torch.randn(2, 1, 8000, generator=torch.Generator().manual_seed(0)) * 0.1
    ref = np.log(librosa.feature.melspectrogram(y=x[0, 0].numpy(), sr=8000, n_fft=256, hop_length=80, n_mels=40,
                                                pad_mode="reflect") + 1e-6)
    assert np.abs(encoder.log_mel(x)[0].numpy() - ref).max() < 1e-4
    t = torch.arange(8000) / 8000
    tone = (0.5 * torch.sin(2 * torch.pi * 1000 * t)).view(1, 1, -1)
    centres = librosa.mel_frequencies(n_mels=42, fmax=4000)[1:-1]
    assert abs(centres[int(encoder.log_mel(tone)[0].mean(-1).argmax())] - 1000) < 60
    cfg = speech_cfg(speech_folder, "model.frontend=logmel", "model.kernels=[3, 3]", "model.strides=[1, 2]", steps=2)
    result = run_local(cfg, tmp_path / "run", log=_quiet)
    assert result["steps"] == 2 and 0 <= result["test"]["mean"] <= 1
    with pytest.raises(ConfigError, match="n_fft=4096 is longer than a clip"):
        speech_cfg(speech_folder, "model.frontend=logmel", "model.n_fft=4096")
    # cepstral mean normalisation: each band's mean over the clip is 0, and a fixed gain cancels
    cmn = AudioEncoder(hidden=8, context=8, frontend="logmel", kernels=(3,), strides=(1,), cmn=True)
    assert float(cmn.log_mel(x).mean(-1).abs().max()) < 1e-4
    cmn.load_state_dict(encoder.state_dict())
    cmn.eval()  # running statistics: a batch mean would hide the gain too
    encoder.eval()
    with torch.no_grad():
        assert torch.allclose(cmn(x), cmn(3 * x), atol=1e-4) and not torch.allclose(encoder(x), encoder(3 * x), atol=1e-3)
    with pytest.raises(ConfigError, match="cmn"):
        speech_cfg(speech_folder, "model.cmn=true")


def test_a_run_trains_on_written_audio_shards_that_fit_it_and_refuses_others(speech_folder, tmp_path):
    from metassl.generate.shards import ShardWriter
    from metassl.registry import build_generator, load_unlabelled

    cfg = speech_cfg(speech_folder)
    source = build_generator(cfg, load_unlabelled(cfg))
    with ShardWriter(str(tmp_path / "shards"), episodes_per_shard=4) as writer:
        writer.write([source.record(i) for i in range(8)])
    shards = f"generator.shards={tmp_path / 'shards'}"
    result = run_local(speech_cfg(speech_folder, shards), tmp_path / "run", log=_quiet)
    assert result["steps"] == 3
    with pytest.raises(ConfigError, match=r"float32 \[1, 2000\] items, but the config asks for .* \[1, 4000\]"):
        run_local(speech_cfg(speech_folder, shards, "data.clip_seconds=0.5"), tmp_path / "other", log=_quiet)


def test_auto_precision_leaves_speech_runs_in_fp32(speech_folder, monkeypatch):
    import metassl.trainer as tr

    monkeypatch.setattr(tr, "has_bf16_units", lambda device: True)
    assert tr.training_precision(speech_cfg(speech_folder, "train.precision=auto"), torch.device("cpu")) == "fp32"

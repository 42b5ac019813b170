"""Run reports: curves, training episodes and report.md from run directories (fake ones and one real run)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from metassl import config
from metassl.data.episodes import Episode
from metassl.errors import MetasslError
from metassl.report import ReportError, compare, episode_grid, main, read_scalars, training_episodes, write_report

OMNIGLOT = ["data.dataset=omniglot", "data.protocol=unsupervised", "generator.kind=augment", "episodes.n_way=5",
            "episodes.n_query=2", "episodes.meta_batch=2", "model.hidden=8", "generator.ssl_views=true",
            "objective.ssl_weight=0.5", "train.steps=30"]
LABELLED = ["data.dataset=digits", "train.steps=30"]  # no generated episodes to draw: a quicker report
VAL = [(10, 0.50), (20, 0.70), (30, 0.60)]  # best: 70% at step 20


def png(path):
    """The image at `path` as an array, after checking it is a whole, valid PNG with something drawn on it."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 5, f"{path} is blank"
    return pixels


def fake_run(path, overrides=OMNIGLOT, *, val=VAL, val_tag="val/acc", result=None, ssl=True):
    """A run directory as train_loop leaves it: config.yaml, TensorBoard scalars and result.json."""
    from torch.utils.tensorboard import SummaryWriter

    path.mkdir(parents=True)
    cfg = config.load(None, [f"name={path.name}", *overrides])
    config.dump(cfg, path / "config.yaml")
    writer = SummaryWriter(str(path / "tensorboard"))
    for step in (10, 20, 30):
        writer.add_scalar("train/meta_loss", 2.0 - step / 30, step)
        writer.add_scalar("train/query_acc", 0.3 + step / 100, step)
        if ssl:
            for tag, value in (("ssl_loss", 3.0), ("simclr_loss", 2.5), ("rotation_loss", 0.5), ("rotation_acc", 0.6)):
                writer.add_scalar(f"train/{tag}", value - step / 100, step)
        writer.add_scalar("perf/episodes_per_s", 40.0 + step, step)
        writer.add_scalar("perf/wait_frac", 0.1, step)
        writer.add_scalar("lr", 1e-3, step)
    for step, score in val:
        writer.add_scalar(val_tag, score, step)
        writer.add_scalar("val/ci95", 0.05, step)
    writer.close()
    if result is None:
        result = {"name": path.name, "best_step": 20, "steps": 30, "best_val": 0.7, "train_minutes": 1.25,
                  "val_history": [list(v) for v in val], "loss_history": [[30, 1.0]],
                  "test": {"metric": "accuracy", "mean": 0.8123, "ci95": 0.0111, "episodes": 100,
                           "protocol": {"dataset": "omniglot", "split": "test", "n_way": 5, "k_shot": 1,
                                        "n_query": 15, "seed": 0}, "extra": {}}}
    (path / "result.json").write_text(json.dumps(result))
    return path


def test_report_of_an_augment_run_has_curves_episodes_and_the_numbers(tmp_path):
    run = fake_run(tmp_path / "umtra")
    written = write_report(run)
    assert set(written) == {"curves", "episodes", "report"}
    assert all(p.parent == run for p in written.values())
    curves, episodes = png(written["curves"]), png(written["episodes"])
    assert curves.shape[1] > curves.shape[0]  # panels side by side
    assert episodes.shape[1] > 2 * episodes.shape[0]  # three 5-row episodes side by side
    text = written["report"].read_text()
    assert "81.23 +- 1.11%" in text and "100 episodes" in text
    assert "Best meta-val accuracy: 70.00% at step 20" in text
    assert "| 20 | 70.00 +- 5.00% | best |" in text and "| 30 | 60.00 +- 5.00% |  |" in text
    assert "omniglot (unsupervised protocol)" in text and "| generator | augment |" in text
    assert "| ssl_weight | 0.5 (simclr 1.0, rotation 1.0) |" in text and "| steps run | 30 of 30 |" in text
    assert "| minutes | 1.2 |" in text or "| minutes | 1.3 |" in text
    assert "![learning curves](curves.png)" in text and "![training episodes](episodes.png)" in text
    assert f"tensorboard --logdir {run / 'tensorboard'}" in text
    assert "untrained" not in text


def test_untrained_baseline_appears_when_result_json_has_one(tmp_path):
    run = fake_run(tmp_path / "base")
    result = json.loads((run / "result.json").read_text())
    result["untrained"] = {**result["test"], "mean": 0.4, "ci95": 0.02}
    (run / "result.json").write_text(json.dumps(result))
    text = write_report(run, episodes_png=False)["report"].read_text()
    assert "untrained network, same episodes: 40.00 +- 2.00%" in text
    assert not (run / "episodes.png").exists()


def test_read_scalars_keeps_the_last_value_written_for_each_step(tmp_path):
    """A run resumed from its step-20 checkpoint writes steps 30 again in a second event file."""
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "tensorboard"
    first = SummaryWriter(str(logdir))
    for step in (10, 20, 30):
        first.add_scalar("train/meta_loss", 1.0, step, walltime=1000.0 + step)
    first.close()
    second = SummaryWriter(str(logdir))
    for step in (30, 40):
        second.add_scalar("train/meta_loss", 2.0, step, walltime=2000.0 + step)
    second.close()
    assert len(list(logdir.iterdir())) == 2
    s = read_scalars(logdir)["train/meta_loss"]
    assert s.steps.tolist() == [10, 20, 30, 40]
    assert s.values.tolist() == [1.0, 1.0, 2.0, 2.0]
    assert read_scalars(tmp_path / "absent") == {}


def test_error_run_still_reports_what_it_recorded(tmp_path):
    message = "step 31: the loss (nan) or the meta-gradient (norm nan) is not finite; training stopped"
    result = {"name": "diverged", "error": message, "steps": 31, "skipped_steps": 0, "best_val": 0.7,
              "val_history": [[10, 0.5], [20, 0.7], [30, float("nan")]], "loss_history": [[10, 1.0]],
              "resumed_at": []}
    run = fake_run(tmp_path / "diverged", val=[], result=result, ssl=False)
    written = write_report(run)
    png(written["curves"])
    text = written["report"].read_text()
    assert "**The run ended in error:** " + message in text
    assert "No meta-test result (the run ended in error)." in text
    assert "Best meta-val accuracy: 70.00% at step 20" in text  # from result.json: no val/ scalars
    assert "| 30 | not finite |  |" in text
    assert "| steps run | 31 of 30 |" in text and "TensorBoard wall times" in text


def test_sinusoid_run_reports_mse_and_lower_is_better(tmp_path):
    sinusoid = ["data.dataset=sinusoid", "model.backbone=mlp", "learner.name=maml", "train.steps=30"]
    result = {"name": "sine", "best_step": 30, "steps": 30, "val_history": [[10, 1.5], [20, 0.9], [30, 0.4]],
              "test": {"metric": "mse", "mean": 0.42, "ci95": 0.03, "episodes": 50,
                       "protocol": {"dataset": "sinusoid", "k_shot": 1}, "extra": {"mse_1_step": 0.8}}}
    run = fake_run(tmp_path / "sine", sinusoid, val=[(10, 1.5), (20, 0.9), (30, 0.4)], val_tag="val/mse",
                   result=result, ssl=False)
    written = write_report(run)
    assert set(written) == {"curves", "report"}  # labelled tasks: no generated episodes to draw
    png(written["curves"])
    text = written["report"].read_text()
    assert "meta-test mse: 0.4200 +- 0.0300" in text and "| mse_1_step | 0.8 |" in text
    assert "Best meta-val mse: 0.4000 at step 30" in text


def test_a_directory_without_a_run_raises_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="holds no result.json and no tensorboard") as info:
        write_report(tmp_path)
    assert str(tmp_path) in str(info.value) and isinstance(info.value, MetasslError)
    with pytest.raises(ReportError, match="does not exist"):
        main([str(tmp_path / "missing")], None, log=lambda *_: None)


def test_compare_and_main_draw_several_runs(tmp_path):
    a = fake_run(tmp_path / "runs" / "a", LABELLED)
    b = fake_run(tmp_path / "runs" / "b", LABELLED, val=[(10, 0.6), (20, 0.8)])
    one = png(compare([a], tmp_path / "one.png"))
    two = png(compare([a, b], tmp_path / "two.png"))
    assert one.shape == two.shape and not np.array_equal(one, two)  # the second run's curve is drawn
    lines = []
    assert main([str(a), str(b)], None, log=lines.append) == 0
    assert f"comparison: {tmp_path / 'runs' / 'compare.png'}" in lines
    assert f"report: {a / 'report.md'}" in lines and f"report: {b / 'report.md'}" in lines
    png(tmp_path / "runs" / "compare.png")
    empty = fake_run(tmp_path / "noval", LABELLED, val=[], result={"name": "noval"})
    with pytest.raises(ReportError, match="recorded a meta-validation"):
        compare([empty], tmp_path / "none.png")


def test_main_reports_runs_kept_in_object_storage(tmp_path, s3_endpoint):
    if s3_endpoint is None:
        pytest.skip("moto is not installed (pip install 'moto[server]'): no local S3 server")
    import pyarrow.fs as pafs

    s3 = pafs.FileSystem.from_uri("s3://metassl")[0]
    for name in ("a", "b"):
        pafs.copy_files(str(fake_run(tmp_path / name, LABELLED)), f"metassl/reports/{name}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    lines = []
    assert main(["s3://metassl/reports/a", "s3://metassl/reports/b"], None, log=lines.append) == 0
    assert "report: s3://metassl/reports/a/report.md" in lines
    assert "comparison: s3://metassl/reports/compare.png" in lines
    stored = {i.path for i in s3.get_file_info(pafs.FileSelector("metassl/reports", recursive=True))}
    assert {"metassl/reports/a/report.md", "metassl/reports/b/curves.png", "metassl/reports/compare.png"} <= stored
    report = s3.open_input_stream("metassl/reports/b/report.md").read().decode()
    assert "81.23 +- 1.11%" in report
    with pytest.raises(ReportError, match="s3://metassl/reports/none"):
        main(["s3://metassl/reports/none"], None, log=lines.append)


def _episode(n_way, shots=1, queries=2, channels=1):
    x = torch.rand(n_way * shots, channels, 28, 28)
    return Episode(x, torch.arange(n_way).repeat_interleave(shots),
                   torch.rand(n_way * queries, channels, 28, 28), torch.arange(n_way).repeat_interleave(queries))


def test_episode_grid_caps_classes_and_draws_grey_and_colour_images(tmp_path):
    small = png(episode_grid(_episode(2), tmp_path / "small.png", title="2-way"))
    eight = png(episode_grid(_episode(8, queries=5), tmp_path / "eight.png"))
    many = png(episode_grid(_episode(64, queries=5), tmp_path / "many.png", title="64-way"))
    colour = png(episode_grid(_episode(3, shots=2, channels=3), tmp_path / "rgb.png"))
    assert many.shape == eight.shape  # at most 8 rows and 3 queries drawn
    assert small.shape[0] < many.shape[0] and colour.shape[1] > small.shape[1]  # 2 shots: a wider row
    signal = Episode(torch.rand(5, 1), torch.rand(5, 1), torch.rand(10, 1), torch.rand(10, 1))
    with pytest.raises(ReportError, match="only image and audio classification"):
        episode_grid(signal, tmp_path / "signal.png")
    assert not (tmp_path / "signal.png").exists()


def test_audio_episodes_are_drawn_as_spectrograms(tmp_path):
    from metassl.report import spectrogram

    t = torch.arange(8000) / 8000
    tone = (0.5 * torch.sin(2 * torch.pi * 1000 * t)).view(1, -1)
    db = spectrogram(tone)
    assert db.shape[0] == 129 and abs(int(db.mean(1).argmax()) - 32) <= 1  # 1 kHz: bin 1000 / (8000 / 256)
    clips = torch.stack([tone, 0.1 * torch.randn(1, 8000)])
    episode = Episode(clips, torch.arange(2), clips.repeat_interleave(2, dim=0), torch.arange(2).repeat_interleave(2))
    picture = png(episode_grid(episode, tmp_path / "audio.png", title="2-way audio"))
    assert picture.shape[0] > 50 and picture.std() > 0


@pytest.mark.slow
def test_report_shows_the_episodes_a_real_run_trained_on(tmp_path, monkeypatch):
    """Self-improving cluster run (encoder: the network itself, version 1 at step 0), trained for real."""
    from metassl.generate import source
    from metassl.trainer import run_local

    seen = []
    batch = source.TrainingSource.batch
    monkeypatch.setattr(source.TrainingSource, "batch",
                        lambda self, step: seen.append(batch(self, step)) or seen[-1])
    cfg = config.load(None, [
        "name=cactus", "data.dataset=digits", "data.image_size=16", "generator.kind=cluster", "generator.encoder=model",
        "generator.clusters=8", "generator.partitions=1", "generator.refresh_every=1", "episodes.n_query=2",
        "episodes.meta_batch=3", "model.hidden=8", "train.steps=2", "train.log_every=1", "train.val_every=0",
        "train.val_episodes=4", "train.checkpoint_every=2", "eval.episodes=4", "generator.actors=0"])
    run_local(cfg, tmp_path / "cactus", log=lambda *_: None)
    trained_on = seen[0].records  # step 0: episodes 0, 1, 2
    shown = training_episodes(cfg)
    assert [r.episode_id for r in shown] == [0, 1, 2] and {r.encoder_version for r in shown} == {1}
    for mine, theirs in zip(shown, trained_on):
        assert torch.equal(mine.episode.support_x, theirs.episode.support_x)
        assert torch.equal(mine.episode.query_x, theirs.episode.query_x)
    assert seen[1].records[0].encoder_version == 2  # refreshed after step 1: later episodes differ
    written = write_report(tmp_path / "cactus")
    assert set(written) == {"curves", "episodes", "report"}
    png(written["episodes"])
    png(written["curves"])
    text = written["report"].read_text()
    assert "| generator | cluster, 8 clusters x 1 partitions, encoder model |" in text
    assert "| steps run | 2 of 2 |" in text and "meta-test accuracy:" in text

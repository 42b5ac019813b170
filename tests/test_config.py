"""Config loading: every shipped file loads, bad input names the key."""
from pathlib import Path

import pytest

from metassl import config
from metassl.errors import ConfigError

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_experiments_folder_has_configs():
    assert EXPERIMENTS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_config_loads(path):
    cfg = config.load(path)
    assert cfg.name == path.stem


@pytest.mark.parametrize("override, message", [
    ("learner.inner_lr=-0.1", "learner.inner_lr=-0.1 must be > 0"),
    ("episodes.n_way=1", "episodes.n_way=1 must be >= 2"),
    ("learner.name=snail", "learner.name='snail' is not one of"),
    ("learner.nmae=maml", "unknown config key in 'learner' 'nmae'"),
    ("optimm.outer_lr=1", "unknown config key 'optimm'"),
    ("train.steps=ten", "train.steps='ten' must be of type int"),
    ("model.norm=weird", "model.norm='weird' is not one of"),
    ("episodes.k_shot=0", "episodes.k_shot=0 must be > 0"),
    ("data.dataset=sinusoid", "needs model.backbone='mlp'"),
    ("noequals", "must look like key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert message in str(err.value)


def test_overrides_and_round_trip(tmp_path):
    cfg = config.load(None, ["learner.name=maml", "optim.outer_lr=3e-4", "model.mlp_hidden=[8, 8]"])
    assert cfg.learner.name == "maml" and cfg.optim.outer_lr == 3e-4 and cfg.model.mlp_hidden == (8, 8)
    config.dump(cfg, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml") == cfg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(bad)


def test_auto_generator_actors_share_the_cpus_left_after_the_workers():
    assert config.load(None).generator.actors == -1  # auto by default
    assert config.actors_per_worker(-1, workers=2, cpus=2) == 1  # none left: still 1 each
    assert config.actors_per_worker(-1, workers=2, cpus=8) == 3
    assert config.actors_per_worker(-1, workers=1, cpus=16) == 15
    assert config.actors_per_worker(0, workers=2, cpus=8) == 0  # an explicit number is kept
    with pytest.raises(ConfigError, match="generator.actors=-2"):
        config.load(None, ["generator.actors=-2"])

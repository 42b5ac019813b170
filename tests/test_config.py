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


# --- hostile config files: every category fails with one ConfigError naming the problem ---------

def _lol(levels: int = 9) -> str:
    """A 'billion laughs' file: each anchor is nine aliases of the previous one."""
    text = 'a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n'
    for i in range(1, levels + 1):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


HOSTILE = {
    "binary": (bytes(range(256)) * 4, "not UTF-8"),
    "utf16": ("name: x\n".encode("utf-16"), "not UTF-8"),
    "deep_lists": (("a: " + "[" * 3000 + "]" * 3000).encode(), "deeper than"),
    "deep_maps": ("".join("  " * i + f"k{i}:\n" for i in range(200)).encode(), "deeper than"),
    "alias_in_space": (b"tune:\n  space: &s\n    learner.inner_lr: *s\n", "recursive alias"),
    "alias_anywhere": (b"name: &n [*n]\n", "recursive alias"),
    "laughs": (_lol().encode(), "expands"),
    "huge": (b"# " + b"x" * (2 << 20), "larger than"),
    "duplicate_key": (b"seed: 1\nseed: 2\n", "twice"),
    "not_a_mapping": (b"- 1\n- 2\n", "mapping"),
    "tab_indent": (b"a:\n\tb: 1\n", "not valid YAML"),
    "python_tag": (b"name: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_give_one_clear_error(name, tmp_path):
    content, message = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value).strip() or "not valid YAML" in str(err.value)


def _float_keys(cls=config.Config, prefix=""):
    import dataclasses
    import typing
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _float_keys(tp, key + ".")
        elif typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is float:
            yield key + "[0]"
        elif tp is float or float in typing.get_args(tp):
            yield key


@pytest.mark.parametrize("key", list(_float_keys()))
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_every_float_refuses_nan_and_infinity(key, value):
    override = f"{key[:-3]}=[{value}, 0.5, 0.5]" if key.endswith("[0]") else f"{key}={value}"
    with pytest.raises(ConfigError, match=f"{key.replace('[', '.').replace(']', '.')}=.*finite"):
        config.load(None, [override])


@pytest.mark.parametrize("name", ["../../../../tmp/x", "/abs", "a/b", ".hidden", "", "x" * 101, "a b", "\u00e9t\u00e9"])
def test_run_names_must_be_plain(name):
    with pytest.raises(ConfigError, match="plain name"):
        config.load(None, [f"name={name!r}" if name else "name=''"])


@pytest.mark.parametrize("override, key", [
    ("episodes.meta_batch=100000000000", "episodes.meta_batch"),
    ("episodes.n_way=1000000000", "episodes.n_way"),
    ("episodes.n_query=10000000000", "episodes.n_query"),
    ("data.image_size=100000", "data.image_size"),
    ("model.hidden=60000", "model.hidden"),
    ("eval.episodes=100000000000", "eval.episodes"),
    ("seed=-1", "seed"),
    ("seed=99999999999999999999999", "seed"),
    ('data.root="a\\0b"', "data.root"),
])
def test_sizes_that_cannot_fit_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(None, [override])


def test_an_empty_config_is_a_valid_default(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert config.load(empty) == config.load(None)
    comment = tmp_path / "comment.yaml"
    comment.write_text("# nothing set\n")
    assert config.load(comment) == config.load(None)


def test_vectorize_needs_maml():
    with pytest.raises(ConfigError, match="learner.vectorize"):
        config.load(None, ["learner.vectorize=true", "learner.name=protonet"])
    assert config.load(None, ["learner.vectorize=true", "learner.name=maml", "model.norm=batch"]).learner.vectorize


def test_zero_head_is_for_maml_and_frees_the_evaluation_width():
    with pytest.raises(ConfigError, match="zero_head=true is for learner.name 'maml' or 'fomaml'"):
        config.load(None, ["learner.zero_head=true"])  # the default learner is protonet
    with pytest.raises(ConfigError, match="do not combine"):
        config.load(None, ["learner.name=maml", "learner.zero_head=true", "learner.learn_inner_lr=true"])
    with pytest.raises(ConfigError, match="learner.zero_head=true adapts a head of any width"):
        config.load(None, ["learner.name=fomaml", "episodes.n_way=10", "eval.n_way=5"])
    cfg = config.load(None, ["learner.name=fomaml", "learner.zero_head=true", "episodes.n_way=10", "eval.n_way=5"])
    assert cfg.learner.zero_head and cfg.eval.n_way == 5

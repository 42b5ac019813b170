"""The Python API (metassl/api.py): train, load, adapt, predict, evaluate and export, as the CLI does."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import metassl
from metassl import config
from metassl.api import Learner, Run, resolve_config
from metassl.cli import main
from metassl.errors import ConfigError, DataError, MetasslError
from metassl.evaluation import eval_shape, mean_ci95
from metassl.meta.functional import forward
from metassl.registry import build_backbone, build_learner, build_sampler

REPO = Path(__file__).resolve().parents[1]
TINY = {"model.hidden": 8, "train.steps": 2, "train.log_every": 1, "train.val_every": 2, "train.val_episodes": 5,
        "train.checkpoint_every": 2, "eval.episodes": 10, "episodes.meta_batch": 2, "episodes.n_query": 3}
# one run per learner on the bundled digits; the BatchNorm variants test both kinds of statistics
LEARNERS = {
    "protonet": {"model.norm": "batch"},  # running statistics
    "matchingnet": {},
    "maml": {"model.norm": "batch", "learner.eval_inner_steps": 2},  # support-set statistics, 2 test-time steps
    "reptile": {"learner.inner_steps": 2},
}


def _quiet(line):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one torch thread each is fastest, and spares a busy machine from oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(name)`: a tiny local run of learner `name` on the bundled digits, trained once per module."""
    done = {}

    def get(name: str) -> Run:
        if name not in done:
            done[name] = metassl.train(backend="local", run_dir=tmp_path_factory.mktemp(name) / "run", log=_quiet,
                                       overrides={**TINY, "learner.name": name, **LEARNERS[name]})
        return done[name]
    return get


@pytest.fixture(params=list(LEARNERS))
def run(request, runs) -> Run:
    return runs(request.param)


def _cli_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_import_is_cheap_and_the_api_is_at_the_top_level():
    code = ("import sys, metassl; assert 'torch' not in sys.modules and 'ray' not in sys.modules\n"
            "import metassl.api, metassl.trainer, metassl.evaluation\n"
            "assert metassl.train is metassl.api.train and metassl.evaluate is metassl.api.evaluate\n"
            "from metassl import load, export, Run, Learner, Predictor\n"
            "assert metassl.load is load is metassl.api.load")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_run_holds_the_result_json_and_the_best_checkpoint(run):
    assert run.result == json.loads((Path(run.run_dir) / "result.json").read_text())
    assert run.test_accuracy == run.result["test"]["mean"] and run.test_ci95 == run.result["test"]["ci95"]
    assert Path(run.checkpoint).is_file() and run.checkpoint.name == "best.pt"
    assert run.config == config.load(Path(run.run_dir) / "config.yaml")


def test_adapt_then_predict_gives_the_accuracy_of_metassl_eval(run, capsys):
    learner = run.load()
    cli = _cli_json(capsys, run.run_dir, "--episodes", 6, "--k-shot", 2)
    n_way, _, n_query = eval_shape(run.config)
    sampler = build_sampler(run.config, "test", n_way=n_way, k_shot=2, n_query=n_query, seed=run.config.eval.seed)
    accuracies = []
    for i in range(6):
        ep = sampler.episode(i)
        logits = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
        assert logits.shape == (n_way * n_query, n_way) and not logits.requires_grad
        assert torch.equal(logits, learner.learner.predict(learner.model, learner.params, learner.buffers, ep))
        accuracies.append(float((logits.argmax(-1) == ep.query_y).float().mean()))
    predict = learner.adapt(ep.support_x, ep.support_y)  # no query sees another: any split of them agrees
    assert torch.allclose(torch.cat([predict(ep.query_x[:5]), predict(ep.query_x[5:])]), logits, atol=1e-5)
    assert mean_ci95(accuracies)[0] == cli["mean"]


def test_evaluate_is_metassl_eval(run, capsys):
    options = dict(episodes=7, k_shot=2, n_query=4, seed=3)
    cli = _cli_json(capsys, run.run_dir, "--episodes", 7, "--k-shot", 2, "--n-query", 4, "--seed", 3)
    assert metassl.evaluate(run, **options).to_dict() == cli
    assert run.evaluate(**options).to_dict() == cli
    assert metassl.evaluate(str(run.checkpoint), **options).to_dict() == cli
    assert metassl.evaluate(run.load(), **options).to_dict() == cli


def test_evaluate_shapes_is_metassl_eval_shapes(run, capsys):
    cli = _cli_json(capsys, run.run_dir, "--episodes", 7, "--shapes", "3w2s4q,3w1s", "--seed", 3)
    got = metassl.evaluate_shapes(run, [(3, 2, 4), (3, 1, None)], episodes=7, seed=3)
    assert [r.to_dict() for r in got] == cli
    assert got[0].to_dict() == metassl.evaluate(run, n_way=3, k_shot=2, n_query=4, episodes=7, seed=3).to_dict()
    for shapes, message in (([], "shapes is empty"), ([(3, 2)], "is not (n_way, k_shot, n_query)"),
                            ([(3, 0, 4)], "k_shot=0 must be an integer >= 1")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            metassl.evaluate_shapes(run, shapes, episodes=7)
    with pytest.raises(TypeError):
        metassl.evaluate_shapes(run, [(3, 2, 4)], n_way=3)  # the shape carries n_way


def test_export_loads_into_a_freshly_built_backbone_with_identical_outputs(run, tmp_path):
    path = run.export(tmp_path / "out" / "weights.pt")
    state = torch.load(path, weights_only=True)
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    cfg = config.load(path.parent / "config.yaml")
    assert cfg == run.config
    fresh = build_backbone(cfg, build_learner(cfg))
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    learner = run.load()
    x = torch.rand(6, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        assert torch.equal(fresh(x), forward(learner.model, learner.params, learner.buffers, x))


def test_adapt_rejects_bad_input_naming_the_problem(run):
    learner = run.load()
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 0, 1, 1, 2, 2])
    cases = [
        ((torch.rand(6, 3, 28, 28), y), "shape [6, 3, 28, 28]"),
        ((torch.rand(6, 28, 28), y), "[n, 1, 28, 28]"),
        ((torch.rand(0, 1, 28, 28), y[:0]), "empty"),
        ((x, torch.tensor([0, 0, 2, 2, 3, 3])), "0..n_way-1"),
        ((x, torch.tensor([1, 1, 1, 1, 1, 1])), "0..n_way-1"),
        ((x, y[:4]), "6 integer labels"),
        ((x, y.float()), "integer labels"),
        ((x.long(), y), "float tensor"),
    ]
    if learner.n_way is not None:  # MAML and Reptile: a 3-way classifier head
        cases.append(((x[:4], torch.tensor([0, 0, 1, 1])), "3-way classifier head"))
    for args, message in cases:
        with pytest.raises(DataError, match=re.escape(message)):
            learner.adapt(*args)
    predict = learner.adapt(x, y)
    with pytest.raises(DataError, match=re.escape("query_x has shape [4, 1, 14, 14]")):
        predict(torch.rand(4, 1, 14, 14))
    assert predict(np.random.rand(4, 1, 28, 28).astype(np.float32)).shape == (4, 3)  # numpy is fine too


def test_config_forms_and_errors_are_the_cli_ones(tmp_path):
    path = REPO / "experiments" / "digits_protonet.yaml"
    cli_form = resolve_config(str(path), ["train.steps=7", "learner.name=matchingnet"])
    assert cli_form == config.load(path, ["train.steps=7", "learner.name=matchingnet"])
    assert resolve_config(path, {"train.steps": 7, "learner.name": "matchingnet"}) == cli_form
    assert resolve_config(path, **{"train.steps": 7, "learner.name": "matchingnet"}) == cli_form
    assert resolve_config(config.load(path), ["learner.name=matchingnet"], **{"train.steps": 7}) == cli_form
    assert resolve_config(config.to_dict(cli_form)) == cli_form
    assert resolve_config() == config.Config()
    for call, message in [
        (lambda: metassl.train(str(path), overrides=["learner.name=snail"]), "learner.name='snail'"),
        (lambda: metassl.train(str(tmp_path / "missing.yaml")), "missing.yaml"),
        (lambda: metassl.train(overrides="train.steps=3"), "not one string"),
        (lambda: metassl.train(backend="spark"), "backend='spark'"),
        (lambda: metassl.train(**{"episodes.n_way": 1}), "episodes.n_way=1"),
        (lambda: metassl.evaluate(tmp_path, k_shot=0), "k_shot=0"),
        (lambda: metassl.evaluate(tmp_path, split="dev"), "split='dev'"),
        (lambda: metassl.load(tmp_path), "no checkpoints/"),
    ]:
        with pytest.raises(MetasslError, match=re.escape(message)):
            call()
    assert isinstance(ConfigError("x"), MetasslError)


def test_export_formats_and_refusals(runs, tmp_path):
    run = runs("protonet")
    with pytest.raises(MetasslError, match=r"must end in \.pt or \.safetensors"):
        metassl.export(run, tmp_path / "weights.bin")
    target = tmp_path / "export" / "weights.safetensors"
    try:
        from safetensors.torch import load_file
    except ImportError:
        with pytest.raises(MetasslError, match="pip install safetensors"):
            metassl.export(run, target)
    else:
        metassl.export(run, target)
        state = load_file(str(target))
        assert set(state) == set(torch.load(metassl.export(run, tmp_path / "pt" / "w.pt"), weights_only=True))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("name: something_else\n")
    with pytest.raises(MetasslError, match="already holds another config"):
        metassl.export(run, tmp_path / "other" / "weights.pt")
    assert not (tmp_path / "other" / "weights.pt").exists()


def test_sinusoid_regression_adapts_like_metassl_eval(tmp_path, capsys):
    run = metassl.train(REPO / "experiments" / "sinusoid_maml.yaml", backend="local", run_dir=tmp_path / "run",
                        log=None, overrides=["train.steps=2", "train.val_every=2", "train.val_episodes=3",
                                             "train.checkpoint_every=2", "train.pretrain_baseline_steps=0",
                                             "eval.episodes=4", "episodes.meta_batch=2"])
    assert run.test_accuracy is None and run.test_ci95 is None and run.test.metric == "mse"
    learner = run.load()
    sampler = build_sampler(run.config, "test", n_way=1, k_shot=10, n_query=100, seed=0)
    errors = []
    for i in range(4):
        ep = sampler.episode(i)
        out = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
        assert out.shape == (100, 1)
        errors.append(float(torch.nn.functional.mse_loss(out, ep.query_y)))
    assert mean_ci95(errors)[0] == pytest.approx(run.test.mean, rel=1e-6)
    shapes = metassl.evaluate_shapes(run, [(None, 10, None), (None, 5, None)], episodes=4)  # no n_way here
    assert [r.to_dict() for r in shapes] == [metassl.evaluate(run, k_shot=k, episodes=4).to_dict() for k in (10, 5)]
    with pytest.raises(DataError, match=r"float targets \[10, 1\]"):
        learner.adapt(ep.support_x, ep.support_y.long())


def test_learner_repr_names_what_it_takes(run):
    learner = run.load()
    assert isinstance(learner, Learner)
    assert run.config.learner.name in repr(learner) and "[1, 28, 28]" in repr(learner)


def readme_python_example() -> str:
    """The fenced python block of README.md's "Python API" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) == 1, "README's Python API section should hold one python example"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README.md (Python API example)", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "meta-test accuracy" in out and "this task:" in out and "5-way 5-shot" in out
    state = torch.load(tmp_path / "exported" / "conv4.pt", weights_only=True)
    assert state and (tmp_path / "exported" / "config.yaml").is_file()

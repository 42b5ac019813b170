"""PsCo as an SSL term: Sinkhorn, the loss against hand computations and finite differences, its state, a run."""
import pytest
import torch
import torch.nn.functional as F

from metassl import checkpoint, config
from metassl.errors import CheckpointError, ConfigError
from metassl.ssl.psco import PscoState, mlp, psco_loss, sinkhorn
from metassl.trainer import run_local


def _unit(*shape, seed=0, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def test_sinkhorn_is_psco_row_normalisation_written_out():
    """PsCo's `distributed_sinkhorn(normalization='row')` on one worker, step by step, in float64;
    rows are distributions and the columns end up nearly balanced."""
    scores = _unit(6, 8, seed=1) @ _unit(10, 8, seed=2).T  # cosine similarities [B=6, K=10]
    q = torch.exp(scores / 0.05)
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(0, keepdim=True) / 10
        q = q / q.sum(1, keepdim=True) / 6
    expected = q * 6
    got = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(got, expected)  # float64 in, float64 out
    torch.testing.assert_close(got.sum(1), torch.ones(6, dtype=torch.float64))
    balanced = sinkhorn(scores, iterations=50).sum(0)
    assert float(balanced.max() / balanced.min()) < 1.01  # each entry an equal share of the batch


def test_psco_loss_matches_a_hand_computation():
    b, k, d, shots, t, t2 = 4, 12, 5, 2, 0.2, 0.7
    p1, z2, queue = torch.randn(b, d, dtype=torch.float64), _unit(b, d, seed=3), _unit(k, d, seed=4)
    loss, parts = psco_loss(p1, z2, queue, shots=shots, temperature=t, temperature2=t2)
    p = F.normalize(p1, dim=-1)
    assignment = sinkhorn(z2 @ queue.T)
    supcon, moco = 0.0, 0.0
    every = [queue[j] for i in range(b) for j in torch.topk(assignment[i], shots).indices]
    for i in range(b):
        own = queue[torch.topk(assignment[i], shots).indices].mean(0)
        supcon += torch.logsumexp(torch.stack([p[i] @ s for s in every]) / t2, 0) - p[i] @ own / t2
        logits = torch.cat([(p[i] @ z2[i]).reshape(1), queue @ p[i]]) / t
        moco += -torch.log_softmax(logits, 0)[0]
    assert parts["psco_supcon"] == pytest.approx(float(supcon / b), rel=1e-6)
    assert parts["psco_moco"] == pytest.approx(float(moco / b), rel=1e-6)
    assert float(loss) == pytest.approx(float((supcon + moco) / b), rel=1e-6)


def test_psco_loss_gradient_matches_finite_differences():
    z2, queue = _unit(3, 4, seed=5), _unit(9, 4, seed=6)
    p1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def loss(p):
        return psco_loss(p.double(), z2, queue, shots=2)[0].double()

    # psco_loss computes in the dtype of its inputs (float64 here)
    assert torch.autograd.gradcheck(loss, (p1,), eps=1e-6, atol=1e-6)


def test_psco_state_moves_toward_the_online_network_and_queues_in_order():
    params = {"w": torch.ones(3)}
    buffers = {"bn.running_mean": torch.zeros(2)}
    projector = {"0.weight": torch.zeros(2, 2)}
    state = PscoState(params, buffers, projector, size=5, dim=2, momentum=0.9, seed=0)
    assert torch.allclose(state.queue.norm(dim=1), torch.ones(5))
    state.pending = torch.arange(8.0).reshape(4, 2)
    state.after_step({"w": torch.zeros(3)}, {"bn.running_mean": torch.full((2,), 7.0)},
                     {"0.weight": torch.ones(2, 2)})
    torch.testing.assert_close(state.params["w"], torch.full((3,), 0.9))  # 0.9 * 1 + 0.1 * 0
    torch.testing.assert_close(state.projector["0.weight"], torch.full((2, 2), 0.1))
    torch.testing.assert_close(state.buffers["bn.running_mean"], torch.full((2,), 7.0))  # copied, as PsCo does
    assert state.position == 4 and state.pending is None
    torch.testing.assert_close(state.queue[:4], torch.arange(8.0).reshape(4, 2))
    state.enqueue(torch.full((3, 2), -1.0))  # wraps: entry 4, then 0 and 1
    assert state.position == 2
    assert state.queue[4].tolist() == [-1, -1] and state.queue[:2].tolist() == [[-1, -1], [-1, -1]]
    assert state.queue[2].tolist() == [4, 5]
    copy = PscoState(params, buffers, projector, size=5, dim=2, momentum=0.9, seed=1)
    copy.load_state_dict(state.state_dict())
    assert torch.equal(copy.queue, state.queue) and copy.position == 2
    assert torch.equal(copy.params["w"], state.params["w"])
    small = PscoState(params, buffers, projector, size=4, dim=2, momentum=0.9, seed=0)
    with pytest.raises(CheckpointError, match="objective.psco_queue"):
        small.load_state_dict(state.state_dict())
    other = PscoState({"v": torch.ones(3)}, buffers, projector, size=5, dim=2, momentum=0.9, seed=0)
    with pytest.raises(CheckpointError, match="params"):
        other.load_state_dict(state.state_dict())


def test_psco_heads_are_psco_shapes():
    projector, predictor = mlp(64, 32, 16, last_norm=True), mlp(16, 32, 16, last_norm=False)
    assert projector(torch.randn(5, 64)).shape == (5, 16) == predictor(torch.randn(5, 16)).shape
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == [(64, 32, None), (32, 16, None)]
    assert not projector[-1].affine and not list(projector.buffers())  # batch statistics only


TINY = ["model.hidden=8", "episodes.meta_batch=2", "train.log_every=1", "train.val_every=4",
        "train.val_episodes=10", "train.checkpoint_every=4", "eval.episodes=20", "generator.kind=augment",
        "generator.ssl_views=true", "objective.ssl_weight=0.5", "objective.psco=1", "objective.psco_queue=40",
        "objective.psco_hidden=32", "objective.psco_dim=16"]


def _tiny(*overrides, steps=8):
    return config.load("experiments/digits_protonet.yaml", TINY + [f"train.steps={steps}", *overrides])


def test_a_psco_run_queues_projections_and_resumes_to_the_same_state(tmp_path):
    run_local(_tiny(), tmp_path / "whole", log=lambda *_: None)
    run_local(_tiny(steps=4), tmp_path / "split", log=lambda *_: None)
    run_local(_tiny(), tmp_path / "split", log=lambda *_: None)
    a = checkpoint.load(checkpoint.step_path(tmp_path / "whole", 8))
    b = checkpoint.load(checkpoint.step_path(tmp_path / "split", 8))
    state = a["psco"]
    per_step = 2 * _tiny().episodes.n_way * _tiny().episodes.k_shot  # the SimCLR views of 2 episodes' supports
    assert state["position"] == 8 * per_step % 40
    assert torch.allclose(state["queue"].norm(dim=1), torch.ones(40, dtype=state["queue"].dtype))
    start = PscoState({"w": torch.zeros(1)}, {}, {}, size=40, dim=16, momentum=0.99, seed=0).queue
    assert not torch.equal(state["queue"], start)  # filled with momentum projections
    # the momentum network is an average of the online one, not a copy
    assert not all(torch.equal(state["params"][k], a["params"][k]) for k in state["params"])
    assert not all(torch.equal(v, a["head_params"][f"psco_projector.{k}"]) for k, v in state["projector"].items())
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert torch.equal(a["psco"]["queue"], b["psco"]["queue"]) and a["psco"]["position"] == b["psco"]["position"]
    for k in a["psco"]["params"]:
        assert torch.equal(a["psco"]["params"][k], b["psco"]["params"][k]), k


@pytest.mark.parametrize("override, message", [
    ("objective.psco_momentum=1", "psco_momentum=1"),
    ("objective.psco_shots=41", "psco_shots=41"),
    ("objective.psco_queue=0", "psco_queue"),
])
def test_bad_psco_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        _tiny(override)

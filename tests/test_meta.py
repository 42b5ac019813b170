"""Meta-learners checked against finite differences and hand computations."""
import copy

import pytest
import torch
from torch import nn

from metassl.data.episodes import Episode, stack_episodes
from metassl.meta import MAML, MatchingNet, ProtoNet, Reptile
from metassl.meta.functional import adapt, forward, task_loss
from metassl.models import MLP


def _regression_batch(tasks=3, k=4, q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = []
    for _ in range(tasks):
        a, b = torch.rand(2, generator=g, dtype=torch.float64)
        sx = torch.randn(k, 1, generator=g, dtype=torch.float64)
        qx = torch.randn(q, 1, generator=g, dtype=torch.float64)
        eps.append(Episode(sx, a * torch.sin(sx + b), qx, a * torch.sin(qx + b)))
    return stack_episodes(eps)


def _tiny_mlp():
    torch.manual_seed(0)
    return MLP(1, (4,), 1).double()


def _params(model):
    return {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_second_order_gradient_matches_finite_differences(steps):
    model, batch = _tiny_mlp(), _regression_batch()
    learner = MAML(inner_lr=0.1, inner_steps=steps)
    params = _params(model)
    out = learner.meta_step(model, params, {}, batch)
    analytic = torch.cat([g.flatten() for g in torch.autograd.grad(out.loss, list(params.values()))])

    flat = torch.cat([p.detach().flatten() for p in params.values()])

    def loss_at(vec):
        p, i = {}, 0
        for k, v in params.items():
            p[k] = vec[i:i + v.numel()].view_as(v).clone().requires_grad_()
            i += v.numel()
        return float(learner.meta_step(model, p, {}, batch).loss.detach())

    h = 1e-6
    numeric = torch.zeros_like(flat)
    for i in range(len(flat)):
        e = torch.zeros_like(flat)
        e[i] = h
        numeric[i] = (loss_at(flat + e) - loss_at(flat - e)) / (2 * h)
    rel = (analytic - numeric).norm() / numeric.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"
    # second order matters here: first-order MAML gives a different gradient
    fo = MAML(inner_lr=0.1, inner_steps=steps, first_order=True).meta_step(model, params, {}, batch)
    fo_grad = torch.cat([g.flatten() for g in torch.autograd.grad(fo.loss, list(params.values()))])
    assert (fo_grad - numeric).norm() / numeric.norm() > 1e-3


def test_first_order_maml_equals_query_gradient_at_adapted_params():
    model, batch = _tiny_mlp(), _regression_batch(tasks=2)
    params = _params(model)
    learner = MAML(inner_lr=0.1, inner_steps=3, first_order=True)
    out = learner.meta_step(model, params, {}, batch)
    got = torch.autograd.grad(out.loss, list(params.values()))

    expected = [torch.zeros_like(p) for p in params.values()]
    for t in range(2):
        phi = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        for _ in range(3):
            g = torch.autograd.grad(task_loss(forward(model, phi, {}, batch.support_x[t]), batch.support_y[t]),
                                    list(phi.values()))
            phi = {k: (v - 0.1 * gi).detach().requires_grad_() for (k, v), gi in zip(phi.items(), g)}
        qg = torch.autograd.grad(task_loss(forward(model, phi, {}, batch.query_x[t]), batch.query_y[t]),
                                 list(phi.values()))
        expected = [e + gi / 2 for e, gi in zip(expected, qg)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_reptile_moves_theta_towards_adapted_weights_exactly():
    model, batch = _tiny_mlp(), _regression_batch(tasks=1)
    params = _params(model)
    theta = {k: v.detach().clone() for k, v in params.items()}
    k_steps, inner_lr, eps = 4, 0.05, 0.3

    # phi by an independent route: torch.optim.SGD on a deep copy of the module
    clone = copy.deepcopy(model)
    inner = torch.optim.SGD(clone.parameters(), lr=inner_lr)
    for _ in range(k_steps):
        inner.zero_grad()
        task_loss(clone(batch.support_x[0]), batch.support_y[0]).backward()
        inner.step()
    phi = dict(clone.named_parameters())

    out = Reptile(inner_lr=inner_lr, inner_steps=k_steps).meta_step(model, params, {}, batch)
    outer = torch.optim.SGD(params.values(), lr=eps)
    for k, p in params.items():
        p.grad = out.grads[k]
    outer.step()
    for k in params:
        torch.testing.assert_close(params[k].detach(), theta[k] + eps * (phi[k].detach() - theta[k]),
                                   rtol=0, atol=1e-12)
    # the module itself was never touched
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), theta[k])


class _Identity(nn.Module):
    """Embedding = the input itself (no parameters), so distances can be computed by hand."""

    def forward(self, x):
        return x


def _hand_episode():
    support_x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 5.0]])
    support_y = torch.tensor([0, 0, 1, 1])
    query_x = torch.tensor([[1.0, 1.0], [0.0, 4.0]])
    query_y = torch.tensor([0, 1])
    return Episode(support_x, support_y, query_x, query_y)


def test_protonet_distances_match_hand_computation():
    ep = _hand_episode()
    logits = ProtoNet().predict(_Identity(), {}, {}, ep)
    # prototypes: class 0 = (1, 0), class 1 = (0, 4)
    # query (1,1): d0 = 0 + 1 = 1, d1 = 1 + 9 = 10 ; query (0,4): d0 = 1 + 16 = 17, d1 = 0
    torch.testing.assert_close(logits, -torch.tensor([[1.0, 10.0], [17.0, 0.0]]))
    out = ProtoNet().meta_step(_Identity(), {}, {}, stack_episodes([ep, ep]))
    expected = torch.nn.functional.cross_entropy(-torch.tensor([[1.0, 10.0], [17.0, 0.0]]), ep.query_y)
    assert out.metrics["query_acc"] == 1.0
    torch.testing.assert_close(out.loss, expected)


def test_matchingnet_attention_matches_hand_computation():
    ep = _hand_episode()
    log_probs = MatchingNet(scale=2.0).predict(_Identity(), {}, {}, ep)
    # cosines of query (1,1)/sqrt2 with support directions (nan-safe normalize gives 0 for (0,0)):
    # (0,0) -> 0, (1,0) -> 1/sqrt2, (0,1) -> 1/sqrt2, (0,1) -> 1/sqrt2
    c = 2 ** -0.5
    w = torch.softmax(2.0 * torch.tensor([0.0, c, c, c]), 0)
    p0 = w[0] + w[1]
    # query (0,4): cosines 0, 0, 1, 1
    w2 = torch.softmax(2.0 * torch.tensor([0.0, 0.0, 1.0, 1.0]), 0)
    expected = torch.log(torch.tensor([[p0, 1 - p0], [w2[0] + w2[1], w2[2] + w2[3]]]))
    torch.testing.assert_close(log_probs, expected)


def test_vectorized_maml_equals_loop():
    model, batch = _tiny_mlp(), _regression_batch(tasks=4)
    params = _params(model)
    loop = MAML(inner_lr=0.1, inner_steps=2).meta_step(model, params, {}, batch)
    vect = MAML(inner_lr=0.1, inner_steps=2, vectorize=True).meta_step(model, params, {}, batch)
    torch.testing.assert_close(loop.loss, vect.loss)
    for a, b in zip(torch.autograd.grad(loop.loss, list(params.values())),
                    torch.autograd.grad(vect.loss, list(params.values()))):
        torch.testing.assert_close(a, b)


def test_adapt_does_not_mutate_module():
    model, batch = _tiny_mlp(), _regression_batch(tasks=1)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = _params(model)
    adapted = adapt(model, params, {}, batch.support_x[0], batch.support_y[0], inner_lr=0.5, steps=3)
    assert any(not torch.equal(adapted[k], params[k]) for k in params)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_meta_sgd_step_sizes_get_the_finite_difference_gradient():
    model, batch = _tiny_mlp(), _regression_batch()
    learner = MAML(inner_lr=0.1, inner_steps=2, learn_inner_lr=True)
    weights = _params(model)
    lrs = {k: v.detach().clone().requires_grad_() for k, v in learner.extra_params(weights).items()}
    assert set(lrs) == {"inner_lr." + k for k in weights}
    assert all(torch.all(v == 0.1) for v in lrs.values())
    with torch.no_grad():  # distinct step sizes per weight
        for v in lrs.values():
            v.mul_(torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype).view_as(v))
    params = {**weights, **lrs}
    out = learner.meta_step(model, params, {}, batch)
    analytic = torch.cat([g.flatten() for g in torch.autograd.grad(out.loss, list(lrs.values()))])
    h, numeric, i = 1e-6, [], 0
    for k, v in lrs.items():
        for j in range(v.numel()):
            plus, minus = v.detach().clone(), v.detach().clone()
            plus.view(-1)[j] += h
            minus.view(-1)[j] -= h
            f = [float(learner.meta_step(model, {**weights, **lrs, k: t}, {}, batch).loss) for t in (plus, minus)]
            numeric.append((f[0] - f[1]) / (2 * h))
    numeric = torch.tensor(numeric, dtype=analytic.dtype)
    assert (analytic - numeric).norm() / numeric.norm() < 1e-4
    # one shared step size of 0.1 everywhere is plain MAML
    same = {**weights, **learner.extra_params(weights)}
    plain = MAML(inner_lr=0.1, inner_steps=2).meta_step(model, weights, {}, batch)
    assert torch.allclose(learner.meta_step(model, same, {}, batch).loss, plain.loss, atol=1e-12)


# --- BatchNorm under learners with an inner loop: support-set statistics ----------------------

def _image_batch(tasks=2, n_way=3, k=2, q=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = []
    for _ in range(tasks):
        sx = torch.rand(n_way * k, 1, 16, 16, generator=g)
        qx = torch.rand(n_way * q, 1, 16, 16, generator=g)
        eps.append(Episode(sx, torch.arange(n_way).repeat_interleave(k), qx, torch.arange(n_way).repeat_interleave(q)))
    return stack_episodes(eps)


def _support_bn_model():
    from metassl.models import build_model

    torch.manual_seed(0)
    return build_model("conv4", out_features=3, hidden=8, norm="batch", image_size=16, support_statistics=True)


def test_support_batchnorm_uses_only_support_statistics_and_tracks_nothing():
    from metassl.models.backbones import SupportBatchNorm

    bn = SupportBatchNorm(4)
    x = torch.randn(10, 4, 3, 3) * 3 + 1
    out = bn(x, reference=4)
    ref = nn.functional.batch_norm(x[:4], None, None, training=True)
    assert torch.allclose(out[:4], ref, atol=1e-5)
    assert torch.allclose(bn(x[:4]), ref, atol=1e-5)  # support alone: its own statistics
    assert not list(bn.buffers())
    bn.eval()
    assert torch.equal(bn(x, reference=4), out)  # no train/eval difference


@pytest.mark.parametrize("learner", [MAML(inner_lr=0.1, inner_steps=2), Reptile(inner_lr=0.1, inner_steps=2)],
                         ids=["maml", "reptile"])
def test_inner_loop_learners_normalise_queries_with_support_statistics_only(learner):
    model, batch = _support_bn_model(), _image_batch()
    params = _params(model)
    ep = Episode(batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0])
    full = learner.predict(model, params, {}, ep)
    some = learner.predict(model, params, {}, Episode(ep.support_x, ep.support_y, ep.query_x[:3], ep.query_y[:3]))
    assert torch.allclose(full[:3], some, atol=1e-5)  # a query's output does not depend on other queries
    # training scores queries the same way: the meta-step's query loss equals the test-time one
    one = stack_episodes([ep])
    out = learner.meta_step(model, params, {}, one)
    expected = task_loss(learner.predict(model, params, {}, ep, inner_steps=2), ep.query_y)
    assert torch.allclose(out.loss.detach(), expected, atol=1e-5)


def test_vectorized_maml_equals_loop_with_support_batchnorm():
    model, batch = _support_bn_model(), _image_batch()
    params = _params(model)
    loop = MAML(inner_lr=0.1).meta_step(model, params, {}, batch)
    vec = MAML(inner_lr=0.1, vectorize=True).meta_step(model, params, {}, batch)
    assert torch.allclose(loop.loss, vec.loss, atol=1e-6)
    g_loop = torch.autograd.grad(loop.loss, list(params.values()))
    g_vec = torch.autograd.grad(vec.loss, list(params.values()))
    for a, b in zip(g_loop, g_vec):
        assert torch.allclose(a, b, atol=1e-5)


def test_vectorized_maml_refuses_a_model_with_running_statistics():
    from metassl.errors import ConfigError
    from metassl.models import build_model

    model = build_model("conv4", out_features=3, hidden=8, norm="batch", image_size=16)  # BatchNorm2d
    params, buffers = _params(model), {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(ConfigError, match="running statistics"):
        MAML(inner_lr=0.1, vectorize=True).meta_step(model, params, buffers, _image_batch())


# --- the zeroing trick: a zero head as wide as each episode -------------------------------------

def _conv_model(out_features=3):
    from metassl.models import build_model

    torch.manual_seed(0)
    return build_model("conv4", out_features=out_features, hidden=8, norm="layer", image_size=16)


def test_zero_head_one_step_sets_class_weights_from_support_features_and_leaves_the_body():
    model = _conv_model(out_features=7)  # the model's own 7-way head is never used
    batch = _image_batch(tasks=1, n_way=3, k=2)
    learner = MAML(inner_lr=0.5, inner_steps=1, zero_head=True)
    params = _params(model)
    start = learner.task_start(params, batch.support_y[0])
    assert start["head.weight"].shape == (3, model.embedding_dim) and not start["head.weight"].any()
    adapted = adapt(model, start, {}, batch.support_x[0], batch.support_y[0], inner_lr=0.5, steps=1)
    # with a zero head the features get no inner gradient; each class's weights are
    # lr / n * (sum of its support features - the share of all features): a centred prototype
    for name in params:
        if not name.startswith("head."):
            assert torch.equal(adapted[name], start[name])
    embed = _embedding(model, params, batch.support_x[0])
    onehot = torch.nn.functional.one_hot(batch.support_y[0], 3).to(embed)
    expected = 0.5 / len(embed) * (onehot - 1 / 3).T @ embed
    assert torch.allclose(adapted["head.weight"], expected, atol=1e-5)


def _embedding(model, params, x):
    """The body's features: the same seeded Conv-4 built without a head, run on the head-free params."""
    body = _conv_model(out_features=None)
    return forward(body, {k: v for k, v in params.items() if not k.startswith("head.")}, {}, x).detach()


def test_zero_head_predictions_follow_the_labels_and_serve_any_n_way():
    model = _conv_model(out_features=3)
    learner = MAML(inner_lr=0.5, inner_steps=2, zero_head=True)
    params = _params(model)
    five = _image_batch(tasks=1, n_way=5, k=2, q=3)
    episode = Episode(five.support_x[0], five.support_y[0], five.query_x[0], five.query_y[0])
    logits = learner.predict(model, params, {}, episode)
    assert logits.shape == (15, 5)
    # renumbering the classes renumbers the outputs and nothing else
    perm = torch.tensor([3, 0, 4, 1, 2])
    renamed = Episode(episode.support_x, perm[episode.support_y], episode.query_x, perm[episode.query_y])
    assert torch.allclose(learner.predict(model, params, {}, renamed)[:, perm], logits, atol=1e-5)
    # the meta-gradient reaches the body, never the unused head
    out = learner.meta_step(model, params, {}, five)
    grads = dict(zip(params, torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)))
    assert grads["head.weight"] is None and grads["head.bias"] is None
    assert all(g is not None and g.abs().sum() > 0 for k, g in grads.items() if not k.startswith("head."))


def _classification_batch(tasks=2, n_way=3, k=1, q=2, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = [Episode(torch.randn(n_way * k, 1, side, side, generator=g, dtype=torch.float64),
                   torch.arange(n_way).repeat_interleave(k),
                   torch.randn(n_way * q, 1, side, side, generator=g, dtype=torch.float64),
                   torch.arange(n_way).repeat_interleave(q)) for _ in range(tasks)]
    return stack_episodes(eps)


def test_head_only_maml_adapts_the_head_alone_and_vmap_agrees():
    from metassl.models import Conv4

    torch.manual_seed(0)
    model = Conv4(1, hidden=4, norm="none", out_features=3, image_size=16).double()
    params, batch = _params(model), _classification_batch()
    adapted = adapt(model, params, {}, batch.support_x[0], batch.support_y[0], inner_lr=0.5, steps=2, only="head.")
    for k, v in params.items():
        assert (adapted[k] is v) != k.startswith("head."), k  # the body is the very same tensors
    loop = MAML(inner_lr=0.5, inner_steps=2, head_only=True).meta_step(model, params, {}, batch)
    vect = MAML(inner_lr=0.5, inner_steps=2, head_only=True, vectorize=True).meta_step(model, params, {}, batch)
    full = MAML(inner_lr=0.5, inner_steps=2).meta_step(model, params, {}, batch)
    torch.testing.assert_close(loop.loss, vect.loss)
    assert not torch.allclose(loop.loss, full.loss)
    grads = [torch.autograd.grad(o.loss, list(params.values())) for o in (loop, vect)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert all(float(g.abs().sum()) > 0 for g in grads[0])  # the body learns in the outer loop
    meta_sgd = MAML(inner_lr=0.5, head_only=True, learn_inner_lr=True)
    assert sorted(meta_sgd.extra_params(params)) == ["inner_lr.head.bias", "inner_lr.head.weight"]


def _split_query_cases():
    from metassl.models import Conv4

    def conv(norm, **kw):
        torch.manual_seed(0)
        return Conv4(1, hidden=4, norm=norm, out_features=3, image_size=16, **kw).double()

    def image_batch():
        b = _image_batch()
        return Episode(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y, batched=True)

    return {
        "second order, 2 steps": (_tiny_mlp, _regression_batch, dict(inner_steps=2)),
        "first order": (_tiny_mlp, _regression_batch, dict(inner_steps=2, first_order=True)),
        "Meta-SGD": (_tiny_mlp, _regression_batch, dict(learn_inner_lr=True)),
        "support BatchNorm": (lambda: conv("batch", support_statistics=True), image_batch, {}),
        "LayerNorm, head only": (lambda: conv("layer"), image_batch, dict(head_only=True, inner_steps=2)),
        "zero head": (lambda: conv("layer"), image_batch, dict(zero_head=True)),
        "first order, head only": (lambda: conv("layer"), image_batch, dict(head_only=True, first_order=True)),
    }


@pytest.mark.parametrize("case", list(_split_query_cases()))
def test_the_split_query_pass_gives_the_reference_meta_gradient(case):
    """Default path (`split_query`): the query loss differentiated at the adapted weights, the
    chain rule carried by a surrogate. Reference: one graph through the whole meta-batch.
    float64, tolerance: torch.testing's default for float64 (rtol 1e-7, atol 1e-7)."""
    make_model, make_batch, kw = _split_query_cases()[case]
    model, batch = make_model(), make_batch()
    learner = MAML(inner_lr=0.3, **kw)
    assert learner.split_query
    params = {**_params(model), **{k: v.requires_grad_() for k, v in learner.extra_params(_params(model)).items()}}
    split = learner.meta_step(model, params, {}, batch)
    ref = MAML(inner_lr=0.3, split_query=False, **kw).meta_step(model, params, {}, batch)
    torch.testing.assert_close(split.loss, ref.loss)
    assert split.metrics == pytest.approx(ref.metrics)
    g_split = torch.autograd.grad(split.loss, list(params.values()), allow_unused=True)
    g_ref = torch.autograd.grad(ref.loss, list(params.values()), allow_unused=True)
    for name, a, b in zip(params, g_split, g_ref):
        assert (a is None) == (b is None), name  # the zero head leaves the model's own head unused
        if b is not None:
            torch.testing.assert_close(a, b, msg=lambda m: f"{case}, {name}: {m}")
    assert sum(float(g.abs().sum()) for g in g_ref if g is not None) > 0


def test_split_query_is_a_config_switch():
    from metassl.config import load
    from metassl.registry import build_learner

    assert build_learner(load(None, ["learner.name=maml"])).split_query is True
    assert build_learner(load(None, ["learner.name=maml", "learner.split_query=false"])).split_query is False


@pytest.mark.parametrize("learner_name", ["maml", "protonet", "matchingnet"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_channels_last_models_give_the_reference_meta_gradient(learner_name, norm):
    """A Conv-4 with channels-last convolutions (model.channels_last) against the NCHW reference: the same
    meta-gradient (second-order MAML, with its default split query, against the reference path).
    float64, tolerance: torch.testing's default for float64 (rtol 1e-7, atol 1e-7)."""
    from metassl.models import Conv4

    inner = learner_name == "maml"
    make = {"maml": lambda **kw: MAML(inner_lr=0.3, **kw), "protonet": lambda **kw: ProtoNet(),
            "matchingnet": lambda **kw: MatchingNet()}[learner_name]
    models = []
    for nhwc in (False, True):
        torch.manual_seed(0)
        models.append(Conv4(1, hidden=4, norm=norm, out_features=3 if inner else None, image_size=16,
                            support_statistics=inner, channels_last=nhwc).double())
    b = _image_batch()
    batch = Episode(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y, batched=True)
    params = _params(models[0])
    buffers = [{k: v.clone() for k, v in m.named_buffers()} for m in models]
    ref = make(split_query=False).meta_step(models[0], params, buffers[0], batch)
    fast = make().meta_step(models[1], params, buffers[1], batch)
    torch.testing.assert_close(fast.loss, ref.loss)
    g_ref = torch.autograd.grad(ref.loss, list(params.values()))
    g_fast = torch.autograd.grad(fast.loss, list(params.values()))
    for name, a, r in zip(params, g_fast, g_ref):
        torch.testing.assert_close(a, r, msg=lambda m: f"{name}: {m}")
    for k in buffers[0]:  # BatchNorm's running statistics too
        torch.testing.assert_close(buffers[1][k], buffers[0][k])
    assert sum(float(g.abs().sum()) for g in g_ref) > 0

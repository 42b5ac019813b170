"""SSL losses and the combined objective."""
import math

import pytest
import torch

from metassl.data.episodes import Episode, stack_episodes
from metassl.meta import MAML, Reptile
from metassl.models import Conv4
from metassl.objective import SSLHeads, SSLWeights, combined_gradients, features, ssl_loss
from metassl.ssl.losses import nt_xent, rotation_loss


def test_nt_xent_matches_a_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # view 0 (=e1): similarities to views 1 (e2), 2 (e1, positive), 3 (e2): 0, 1, 0 -> / t
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0)))
    assert math.isclose(float(nt_xent(z1, z2, t)), expected, rel_tol=1e-6)
    # swapping partners makes the loss worse
    assert float(nt_xent(z1, z2.flip(0), t)) > expected


def test_rotation_loss_is_cross_entropy():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert float(rotation_loss(logits, torch.tensor([0, 3]))) < 0.05
    assert float(rotation_loss(logits, torch.tensor([1, 2]))) > 4


def _setup(seed=0, hidden=8, views_of=4, noisy=False):
    """A tiny Conv-4 with SSL heads (float64), SSL views of `views_of` images and a 2-task batch."""
    torch.manual_seed(seed)
    model = Conv4(1, hidden, "layer", out_features=3, image_size=16).double()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    heads = SSLHeads(model.embedding_dim, 4).double()
    head_params = {k: v.detach().clone().requires_grad_() for k, v in heads.named_parameters()}
    x = torch.rand(views_of, 1, 16, 16, dtype=torch.float64)
    views = (x, x.flip(-1) + (0.1 * torch.rand_like(x) if noisy else 0), x.transpose(-1, -2),
             torch.arange(views_of) % 4)
    y = torch.arange(3)
    ep = Episode(torch.rand(3, 1, 16, 16, dtype=torch.float64), y, torch.rand(3, 1, 16, 16, dtype=torch.float64), y)
    return model, params, heads, head_params, views, stack_episodes([ep, ep])


def test_features_skip_the_classifier_head():
    model, params, *_ = _setup()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    assert features(model, params, {}, x).shape == (2, model.embedding_dim)
    torch.testing.assert_close(features(model, params, {}, x), model.features(x))


def test_combined_gradient_is_meta_plus_weighted_ssl_and_heads_get_only_ssl():
    model, params, heads, head_params, views, batch = _setup()
    out = MAML(0.1, 1).meta_step(model, params, {}, batch)
    ssl, parts = ssl_loss(model, params, {}, heads, head_params, views, SSLWeights())
    assert set(parts) == {"simclr_loss", "rotation_loss", "rotation_acc"}
    meta_g = torch.autograd.grad(out.loss, list(params.values()), retain_graph=True)
    tensors = list(params.values()) + list(head_params.values())
    ssl_g = [torch.zeros_like(t) if g is None else g for t, g in zip(
        tensors, torch.autograd.grad(ssl, tensors, retain_graph=True, allow_unused=True))]
    g0, hg0 = combined_gradients(out, ssl, 0.0, params, head_params)
    assert all(float(h.abs().sum()) == 0 for h in hg0)
    for a, m in zip(g0, meta_g):
        torch.testing.assert_close(a, m)
    out = MAML(0.1, 1).meta_step(model, params, {}, batch)  # the call above consumed the graph
    ssl, _ = ssl_loss(model, params, {}, heads, head_params, views, SSLWeights())
    g, hg = combined_gradients(out, ssl, 0.3, params, head_params)
    for a, m, s in zip(g, meta_g, ssl_g):
        torch.testing.assert_close(a, m + 0.3 * s)
    for a, s in zip(hg, ssl_g[len(meta_g):]):
        torch.testing.assert_close(a, 0.3 * s)
        assert float(a.abs().sum()) > 0


def test_reptile_pseudo_gradient_plus_ssl_gradient():
    model, params, heads, head_params, views, batch = _setup()
    out = Reptile(0.1, 2).meta_step(model, params, {}, batch)
    ssl, _ = ssl_loss(model, params, {}, heads, head_params, views, SSLWeights(rotation=0.0))
    ssl_g = torch.autograd.grad(2.0 * ssl, list(params.values()), allow_unused=True, retain_graph=True)
    g, _ = combined_gradients(out, ssl, 2.0, params, head_params)
    for k, a, s in zip(params, g, ssl_g):
        torch.testing.assert_close(a, out.grads[k] + (torch.zeros_like(a) if s is None else s))


def test_nt_xent_over_blocks_of_anchors_averages_to_the_whole_batch():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    whole = nt_xent(z1, z2, 0.3)
    torch.testing.assert_close(nt_xent(z1, z2, 0.3, anchors=(0, 6)), whole)
    blocks = [nt_xent(z1, z2, 0.3, anchors=(s, s + 2)) for s in (0, 2, 4)]
    torch.testing.assert_close(sum(blocks) / 3, whole)
    assert len({round(float(b), 6) for b in blocks}) == 3  # the blocks really differ
    with pytest.raises(ValueError, match="anchors"):
        nt_xent(z1, z2, anchors=(4, 8))


def test_ssl_loss_leaves_batchnorm_running_statistics_unchanged():
    torch.manual_seed(0)
    model = Conv4(1, 4, "batch", out_features=3, image_size=16).double()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    before = {k: v.clone() for k, v in buffers.items()}
    heads = SSLHeads(model.embedding_dim, 4).double()
    head_params = {k: v.detach().clone().requires_grad_() for k, v in heads.named_parameters()}
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64) + 3.0  # far from the initial running mean 0
    views = (x, x.flip(-1), x.transpose(-1, -2), torch.tensor([0, 1, 2, 3]))
    loss, _ = ssl_loss(model, params, buffers, heads, head_params, views, SSLWeights())
    torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert {k for k in buffers if "running_mean" in k}, "the model should have BatchNorm running statistics"
    for k, v in buffers.items():
        assert torch.equal(v, before[k]), k
    # the same forward pass with the live buffers would have moved them: the check above can fail
    features(model, params, buffers, x)
    assert not all(torch.equal(v, before[k]) for k, v in buffers.items())


def _ssl_gradients(rank: int, world: int, port: int, out: str) -> None:
    """One worker of `test_ssl_gradient_over_workers_equals_the_whole_batch_gradient`."""
    import torch.distributed as dist

    from metassl import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, params, heads, head_params, views, _ = _setup(seed=1, hidden=4, views_of=8, noisy=True)
        n = len(views[0]) // world
        mine = tuple(v[rank * n:(rank + 1) * n] for v in views)
        loss, parts = ssl_loss(model, params, {}, heads, head_params, mine, SSLWeights(),
                               gather=distributed.gather_rows)
        tensors = list(params.values()) + list(head_params.values())
        grads = [torch.zeros_like(t) if g is None else g
                 for t, g in zip(tensors, torch.autograd.grad(loss, tensors, allow_unused=True))]
        grads = distributed.average_gradients(grads)
        metrics = distributed.average_metrics({"loss": float(loss.detach()), **parts})
        if rank == 0:
            torch.save({"grads": grads, "metrics": metrics}, out)
    finally:
        dist.destroy_process_group()


def test_ssl_gradient_over_workers_equals_the_whole_batch_gradient(tmp_path):
    # Two gloo workers with 4 pairs each, NT-Xent negatives gathered from both: the averaged
    # gradient must be that of one process on all 8 pairs (it would not be if the gather
    # only let gradients reach each worker's own rows through its own loss).
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.pt")
    mp.start_processes(_ssl_gradients, args=(2, port, out), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    model, params, heads, head_params, views, _ = _setup(seed=1, hidden=4, views_of=8, noisy=True)
    loss, parts = ssl_loss(model, params, {}, heads, head_params, views, SSLWeights())
    tensors = list(params.values()) + list(head_params.values())
    want = [torch.zeros_like(t) if g is None else g
            for t, g in zip(tensors, torch.autograd.grad(loss, tensors, allow_unused=True))]
    assert math.isclose(got["metrics"]["loss"], float(loss.detach()), rel_tol=1e-12)
    assert math.isclose(got["metrics"]["simclr_loss"], parts["simclr_loss"], rel_tol=1e-12)
    for g, w in zip(got["grads"], want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)

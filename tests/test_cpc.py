"""CPC: the loss's gradient against finite differences, its split over workers, and what it learns."""
from __future__ import annotations

import math

import torch

from metassl.models.audio import AudioEncoder, AudioNet
from metassl.ssl.cpc import cpc_loss


def test_cpc_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(3, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, c, w: cpc_loss(z, c, w)[0], (z, c, w))


def test_cpc_shares_of_a_batch_average_to_its_loss():
    g = torch.Generator().manual_seed(1)
    z, c, w = torch.randn(8, 10, 4, generator=g), torch.randn(8, 10, 6, generator=g), torch.randn(3, 6, 4, generator=g)
    whole, _ = cpc_loss(z, c, w)
    halves = [cpc_loss(z[i:i + 4], c[i:i + 4], w, others=z, start=i)[0] for i in (0, 4)]
    assert torch.allclose(whole, sum(halves) / 2, atol=1e-6)
    alone, _ = cpc_loss(z[:4], c[:4], w)
    assert not torch.allclose(alone, halves[0])  # the other worker's clips are negatives too


def test_cpc_is_near_chance_for_unrelated_frames():
    g = torch.Generator().manual_seed(2)
    b, length = 16, 20
    loss, acc = cpc_loss(torch.randn(b, length, 8, generator=g), torch.zeros(b, length, 8), torch.zeros(2, 8, 8))
    # all scores equal: the loss is the log of the number of candidates (B clips + L - 1 frames)
    assert math.isclose(float(loss), math.log(b + length - 1), rel_tol=1e-5)


def _train(signal, steps=100):
    torch.manual_seed(0)
    # kernels equal to strides: frames do not overlap, so nothing of a future frame of white
    # noise is in the context (with overlapping frames CPC reads the samples they share)
    encoder = AudioEncoder(hidden=32, context=32, norm="layer", kernels=(5, 4, 2, 2), strides=(5, 4, 2, 2))
    predictors = torch.nn.Parameter(torch.randn(3, 32, 32) * 0.05)
    opt = torch.optim.Adam([*encoder.parameters(), predictors], lr=3e-3)
    for step in range(steps):
        z, c = encoder(signal(step), frames=True)
        loss, acc = cpc_loss(z, c, predictors)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), acc.item()


def test_cpc_loss_is_lower_for_a_predictable_signal_than_for_noise():
    t = torch.arange(1600) / 8000

    def chirps(step):  # frequency sweeps: each frame differs from the others, predictably
        g = torch.Generator().manual_seed(step)
        f0 = 200 + 1000 * torch.rand(16, 1, 1, generator=g)
        sweep = (torch.rand(16, 1, 1, generator=g) * 2 - 1) * 4000  # Hz per second
        phase = 2 * math.pi * torch.rand(16, 1, 1, generator=g)
        return 0.5 * torch.sin(2 * math.pi * (f0 * t + 0.5 * sweep * t * t) + phase)

    def noise(step):
        return 0.5 * torch.randn(16, 1, 1600, generator=torch.Generator().manual_seed(step))

    chirp_loss, chirp_acc = _train(chirps)
    noise_loss, noise_acc = _train(noise)
    print(f"CPC after 100 steps: chirps {chirp_loss:.3f} (accuracy {chirp_acc:.3f}), "
          f"noise {noise_loss:.3f} ({noise_acc:.3f})")
    chance = math.log(16 + 19)  # 16 clips + the other 19 frames of a clip
    assert noise_loss > 0.97 * chance and noise_acc < 2 / 35
    assert chirp_loss < 0.8 * noise_loss and chirp_acc > 3 / 35


def test_audio_net_embeds_and_adapts_like_any_backbone():
    from torch.func import functional_call

    net = AudioNet(out_features=5, hidden=16, context=16, norm="batch", support_statistics=True)
    x = torch.randn(10, 1, 8000)
    params = dict(net.named_parameters())
    out = functional_call(net, (params, dict(net.named_buffers())), (x,), {"reference": 5})
    assert out.shape == (10, 5)
    # the support rows' outputs do not depend on the queries (support-set statistics only)
    x2 = torch.cat([x[:5], torch.randn(5, 1, 8000)])
    out2 = functional_call(net, (params, dict(net.named_buffers())), (x2,), {"reference": 5})
    assert torch.allclose(out[:5], out2[:5], atol=1e-6)
    grads = torch.autograd.grad(out.pow(2).mean(), list(params.values()), create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), list(params.values()))
    assert all(torch.isfinite(g).all() for g in second)
    z, c = net.features(x, frames=True)
    assert z.shape == (10, 98, 16) and c.shape == (10, 98, 16) and net.features.num_frames(8000) == 98

"""Backbone shapes and options."""
import pytest
import torch

from metassl.errors import ConfigError
from metassl.models import MLP, NORMS, Conv4, build_model


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_conv4_shapes_for_each_norm(norm):
    emb = Conv4(1, 16, norm, None, 28)
    assert emb(torch.rand(3, 1, 28, 28)).shape == (3, 16) == (3, emb.embedding_dim)
    clf = Conv4(3, 16, norm, 5, 84)
    assert clf(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    assert emb.embedding_dim == 16 and clf.embedding_dim == 16 * 5 * 5


def test_conv4_layout_is_four_conv_norm_relu_pool_blocks():
    convs = [m for m in Conv4(1, 64, "batch").modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.out_channels == 64 for c in convs)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in Conv4().modules()) == 4
    assert not any(getattr(m, "track_running_stats", False) for m in Conv4().modules())  # default keeps none


@pytest.mark.parametrize("norm", ["layer", "batch", "batch_transductive"])
def test_conv4_pools_before_its_relu_and_is_the_same_function(norm):
    """The blocks run norm -> max-pool -> ReLU, which is norm -> ReLU -> max-pool exactly:
    outputs, parameter gradients and BatchNorm's running statistics are bitwise equal."""
    torch.manual_seed(0)
    fast = Conv4(1, 8, norm, 5, 28)
    assert [type(m).__name__ for m in fast.features[:4]][2:] == ["MaxPool2d", "ReLU"]
    textbook = Conv4(1, 8, norm, 5, 28)
    textbook.load_state_dict(fast.state_dict())
    blocks = list(textbook.features)
    for b in range(4):
        blocks[4 * b + 2], blocks[4 * b + 3] = blocks[4 * b + 3], blocks[4 * b + 2]
    textbook.features = torch.nn.Sequential(*blocks)
    x = torch.randn(6, 1, 28, 28)
    outs = [m(x) for m in (fast, textbook)]
    assert torch.equal(*outs)
    grads = [torch.autograd.grad(o.square().sum(), list(m.parameters())) for o, m in zip(outs, (fast, textbook))]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert all(torch.equal(a, b) for a, b in zip(fast.buffers(), textbook.buffers()))


def test_mlp_is_1_40_40_1():
    sizes = [(m.in_features, m.out_features) for m in MLP().modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [(1, 40), (40, 40), (40, 1)]


def test_bad_model_options():
    with pytest.raises(ConfigError, match="image_size=8"):
        Conv4(image_size=8)
    with pytest.raises(ConfigError, match="model.norm='bogus'"):
        Conv4(norm="bogus")
    with pytest.raises(ConfigError, match="model.backbone='resnet'"):
        build_model("resnet", out_features=5)


@pytest.mark.parametrize("norm", ["layer", "batch", "batch_transductive"])
def test_channels_last_conv4_is_the_same_function_in_nhwc(norm):
    """channels_last=True: the same parameters (names, shapes, layout), activations in NHWC, and
    outputs, gradients and running statistics equal to the NCHW reference within float rounding
    (relative 1e-4 of the largest entry; NHWC BatchNorm sums in another order)."""
    torch.manual_seed(0)
    ref = Conv4(1, 16, norm, 5, 28)
    fast = Conv4(1, 16, norm, 5, 28, channels_last=True)
    fast.load_state_dict(ref.state_dict())
    assert [k for k, _ in fast.named_parameters()] == [k for k, _ in ref.named_parameters()]
    assert all(p.is_contiguous() for p in fast.parameters())  # stored and saved in the usual layout
    seen = []
    fast.features[1].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(12, 1, 28, 28)
    outs = [m(x) for m in (ref, fast)]
    nhwc = seen[0]
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-4 * float(outs[0].abs().max()))
    grads = [torch.autograd.grad(o.square().sum(), list(m.parameters())) for o, m in zip(outs, (ref, fast))]
    scale = max(float(g.abs().max()) for g in grads[0])
    assert all(float((a - b).abs().max()) <= 1e-4 * scale for a, b in zip(*grads))
    assert all(g.is_contiguous() for g in grads[1])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(ref.buffers(), fast.buffers()))


def test_channels_last_switch_reaches_the_model_and_turns_off():
    from dataclasses import replace

    from metassl.config import Config
    from metassl.models.backbones import ChannelsLastConv2d
    from metassl.registry import build_backbone, build_learner, model_embedder

    def convs(cfg):
        model = build_backbone(cfg, build_learner(cfg))
        return {type(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}

    off = Config()
    assert not off.model.channels_last and convs(off) == {torch.nn.Conv2d}  # default: the NCHW reference path
    cfg = replace(off, model=replace(off.model, channels_last=True))
    assert convs(cfg) == {ChannelsLastConv2d}
    vmapped = replace(cfg, learner=replace(cfg.learner, name="maml", vectorize=True))
    assert convs(vmapped) == {torch.nn.Conv2d}  # vmap cannot restride weights: off under vectorize
    state = build_backbone(off, build_learner(off)).state_dict()
    x = torch.rand(4, 1, 28, 28)
    a, b = model_embedder(cfg, state)(x), model_embedder(off, state)(x)
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_vmapped_maml_refuses_a_channels_last_model():
    from metassl.data.episodes import Episode
    from metassl.meta import MAML

    model = Conv4(1, 8, "layer", 5, 28, channels_last=True)
    params = dict(model.named_parameters())
    batch = Episode(torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
                    torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1), batched=True)
    with pytest.raises(ConfigError, match="model.channels_last: false"):
        MAML(vectorize=True).meta_step(model, params, {}, batch)

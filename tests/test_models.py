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

"""Backbones for few-shot learning: Conv-4 for images, a Transformer for texts, an MLP for regression."""
from metassl.models.backbones import MLP, NORMS, Conv4, build_model, is_transductive, norm_mode

__all__ = ["MLP", "NORMS", "Conv4", "build_model", "is_transductive", "norm_mode"]

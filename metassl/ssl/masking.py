"""Masked-language-modelling views of token items (BERT's recipe).

`mlm_view(items, prob, vocab_size, generator)` picks each real word piece (not [PAD], [CLS]
or [SEP], and not one that is already [MASK]) independently with probability `prob`; a picked piece becomes [MASK] with probability 0.8, a random ordinary piece with 0.1,
and stays as it was with 0.1. Targets hold the original id at picked positions and
IGNORE (-100, what cross-entropy skips) everywhere else, so padding is never a target.
"""
from __future__ import annotations

import torch

from metassl.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS

IGNORE = -100


def maskable(items: torch.Tensor) -> torch.Tensor:
    """bool `[N, L]`: the positions of `items` `[N, 2, L]` that masked-language modelling may pick."""
    ids, attention = items[:, 0], items[:, 1].bool()
    return attention & (ids != CLS_ID) & (ids != SEP_ID) & (ids != PAD_ID) & (ids != MASK_ID)


def mlm_view(items: torch.Tensor, prob: float, vocab_size: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked items `[N, 2, L]`, targets `[N, L]`) of `items` `[N, 2, L]`; see the module doc."""
    ids = items[:, 0]
    allowed = maskable(items)
    picked = (torch.rand(ids.shape, generator=generator) < prob) & allowed
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(len(SPECIAL_TOKENS), max(vocab_size, len(SPECIAL_TOKENS) + 1), ids.shape,
                               generator=generator)
    masked = torch.where(picked & (roll < 0.8), torch.full_like(ids, MASK_ID), ids)
    masked = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    targets = torch.where(picked, ids, torch.full_like(ids, IGNORE))
    return torch.stack([masked, items[:, 1]], dim=1), targets

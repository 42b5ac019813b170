"""A small pre-norm Transformer encoder for texts, usable by every learner like Conv-4.

Input: `[batch, 2, L]` int64 items (row 0 token ids, row 1 attention mask; see
metassl.data.tokenizer). Token embeddings plus learned position embeddings go through
`layers` pre-norm blocks (x + attention(LN(x)), then x + MLP(LN(x)), GELU, 4x width), a final
LayerNorm, and pooling over the real tokens: their mean (`pooling="mean"`), a weighted mean
whose weights are a softmax of a learned score of each state (`"attention"`: the model can
learn which words matter, as IDF weighting does for bags of words), or `"first_last"`: the
mean of the word-piece embeddings (the first layer: a bag of words) beside the mean of the
final states, each scaled to norm sqrt(hidden), so the embedding has 2 x hidden features and
a cosine between two texts is the mean of the two layers' cosines. Padding never enters
attention (its keys are masked) nor the pooled embedding. `features` is the encoder:
`forward(x)` gives the pooled embedding `[batch, embedding_dim]` (hidden, or 2 x hidden for
first_last), `forward(x, tokens=True)` the per-token states `[batch, L, hidden]` (what
masked-language modelling predicts from). With `out_features` a linear head follows, as on
Conv-4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metassl.errors import ConfigError


POOLINGS = ("mean", "attention", "first_last")


class Block(nn.Module):
    """One pre-norm Transformer block.

    Queries and values have a bias, keys none: a key bias adds the same amount to every score
    of a query, which softmax ignores, so its true gradient is zero and Adam would only
    amplify rounding noise into it (and make runs differ by how the batch was split).
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = self.qkv(self.norm1(x)) + bias
        q, k, v = qkv.view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # keep [b, 1, 1, L]: padding keys get no attention
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.out(att.transpose(1, 2).reshape(b, length, dim)), self.dropout, self.training)
        return x + F.dropout(self.down(F.gelu(self.up(self.norm2(x)))), self.dropout, self.training)


class TextEncoder(nn.Module):
    """Token and position embeddings, pre-norm blocks, final LayerNorm, masked mean pooling (module doc)."""

    def __init__(self, vocab_size: int, max_tokens: int, dim: int, layers: int, heads: int, dropout: float,
                 pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"model.pooling={pooling!r} is not one of {list(POOLINGS)}")
        if dim % heads:
            raise ConfigError(f"model.hidden={dim} must be a multiple of model.heads={heads}")
        self.dropout = dropout
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(max_tokens, dim))
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1) if pooling == "attention" else None
        self.pooling = pooling
        self.embedding_dim = 2 * dim if pooling == "first_last" else dim

    def forward(self, x: torch.Tensor, tokens: bool = False) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        if ids.shape[1] > self.positions.shape[0]:
            raise ConfigError(f"texts of {ids.shape[1]} tokens, but the model has positions for "
                              f"{self.positions.shape[0]} (data.max_tokens)")
        words = self.tokens(ids)
        h = words + self.positions[: ids.shape[1]]
        h = F.dropout(h, self.dropout, self.training)
        keep = mask.bool()[:, None, None, :]
        for block in self.blocks:
            h = block(h, keep)
        h = self.norm(h)
        if tokens:
            return h
        if self.score is not None:
            scores = self.score(h).squeeze(-1).masked_fill(mask == 0, float("-inf"))
            return (torch.softmax(scores, dim=1).unsqueeze(-1) * h).sum(1)
        weights = mask.to(h.dtype).unsqueeze(-1)
        count = weights.sum(1).clamp_min(1.0)
        last = (h * weights).sum(1) / count
        if self.pooling != "first_last":
            return last
        first = (words * weights).sum(1) / count
        scale = h.shape[-1] ** 0.5
        return torch.cat([F.normalize(first, dim=-1) * scale, F.normalize(last, dim=-1) * scale], dim=-1)


class TextTransformer(nn.Module):
    """`features` (a TextEncoder) and, with `out_features`, a linear classifier head."""

    def __init__(self, vocab_size: int, max_tokens: int, hidden: int = 128, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1, out_features: int | None = None, pooling: str = "mean"):
        super().__init__()
        self.features = TextEncoder(vocab_size, max_tokens, hidden, layers, heads, dropout, pooling)
        self.embedding_dim = self.features.embedding_dim  # of the pooled text
        self.token_dim = hidden  # of each token's state (what masked-language modelling reads)
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None

    def forward(self, x: torch.Tensor, reference: int | None = None) -> torch.Tensor:
        z = self.features(x)
        return self.head(z) if self.head is not None else z

"""SMLMT episodes (Bansal et al. 2020): masked-word classification tasks from unlabelled text.

An N-way K-shot episode picks N words, then K + Q sentences that contain each; in every
sentence of word j, each occurrence of word j becomes [MASK], and the label is j. The class
is recoverable only from what the context says about the hidden word: the word itself never
appears in its sentences. A sentence may hold several chosen words and then serve several
classes (with only the class's own word masked each time).

Words are the tokenizer's normalised words (lower case, punctuation split off). A word can
make a class when it is alphabetic, at least `min_sentences` sentences hold it (0: K + Q),
and it is not one of the `skip_top` words held by the most sentences (function words such
as "what" or "my" say little about a text).

Episode i depends only on (seed, i) and the corpus: `np.random.default_rng([seed, i])` picks
the words and sentences, then the seed of the torch.Generator that draws the SSL views. With
`ssl_views`, a record also carries `ssl_texts` corpus sentences for the self-supervised
terms: `ssl_x1`/`ssl_x2` two views of them (SimCSE: the two passes differ by dropout; with
`smlmt.word_dropout` p > 0 each view also drops each word with probability p, keeping at
least one) and `rot_x`/`rot_y` their masked-language-modelling view and targets
(metassl.ssl.masking).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from metassl.config import SmlmtConfig
from metassl.data.episodes import Episode, check_int
from metassl.data.text import TextCorpus
from metassl.data.tokenizer import SPECIAL_TOKENS
from metassl.errors import DataError
from metassl.generate.augment import episode_seed
from metassl.generate.record import EpisodeRecord, RecordSource, make_record
from metassl.ssl.masking import mlm_view

MASK = SPECIAL_TOKENS[4]


class SMLMTEpisodes(RecordSource):
    """Masked-word episodes over a TextCorpus: `record(i)`, `episode(i)`, `batch(start, count)`."""

    def __init__(self, corpus: TextCorpus, n_way: int, k_shot: int, n_query: int, settings: SmlmtConfig,
                 seed: int = 0, ssl_views: bool = False):
        if not isinstance(corpus, TextCorpus):
            raise DataError(f"smlmt episodes are made from text; got {type(corpus).__name__}")
        self.n_way = check_int("n_way", n_way, 2)
        self.k_shot = check_int("k_shot", k_shot, 1)
        self.n_query = check_int("n_query", n_query, 1)
        self.seed = check_int("seed", seed, 0)
        episode_seed(self.seed, 0)
        self.settings, self.ssl_views = settings, bool(ssl_views)
        self.tokenizer = corpus.tokenizer()
        self.sentences = [self.tokenizer.words(t) for t in corpus.texts]
        empty = next((i for i, words in enumerate(self.sentences) if not words), None)
        if empty is not None:
            raise DataError(f"meta-train text {empty} ({corpus.texts[empty][:40]!r}) has no word after normalisation")
        # a sentence holds a word when an occurrence survives truncation to max_tokens (else the
        # masked sentence would show no [MASK]); masking only shortens what comes before it
        kept = self.tokenizer.kept_words(self.sentences)
        holders: dict[str, list[int]] = {}
        for i, words in enumerate(self.sentences):
            for w in dict.fromkeys(words[:kept[i]]):  # each sentence once per word, in order
                holders.setdefault(w, []).append(i)
        counts = Counter({w: len(rows) for w, rows in holders.items() if w.isalpha()})
        common = {w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:settings.skip_top]}
        least = settings.min_sentences or self.k_shot + self.n_query
        least = max(least, self.k_shot + self.n_query)
        self.words = sorted(w for w, n in counts.items() if n >= least and w not in common)
        if len(self.words) < self.n_way:
            raise DataError(f"smlmt: only {len(self.words)} words are held by at least {least} sentences "
                            f"(after skipping the {settings.skip_top} most common), fewer than n_way={self.n_way}; "
                            "lower generator.smlmt.skip_top or min_sentences, or use more text")
        self.holders = {w: np.asarray(holders[w]) for w in self.words}

    def record(self, index: int) -> EpisodeRecord:
        """Episode `index`: support `[N*K, 2, L]`, query `[N*Q, 2, L]` (label-major), generator "smlmt"."""
        index = check_int("episode index", index, 0)
        rng = np.random.default_rng([self.seed, index])
        chosen = rng.choice(len(self.words), size=self.n_way, replace=False)
        per_class = self.k_shot + self.n_query
        masked: list[list[str]] = []
        for j in chosen:
            word = self.words[j]
            rows = self.holders[word][rng.choice(len(self.holders[word]), size=per_class, replace=False)]
            masked += [[MASK if w == word else w for w in self.sentences[r]] for r in rows]
        items = self.tokenizer.encode_words(masked).view(self.n_way, per_class, 2, -1)
        length = items.shape[-1]
        episode = Episode(
            support_x=items[:, : self.k_shot].reshape(-1, 2, length),
            support_y=torch.arange(self.n_way).repeat_interleave(self.k_shot),
            query_x=items[:, self.k_shot:].reshape(-1, 2, length),
            query_y=torch.arange(self.n_way).repeat_interleave(self.n_query),
        )
        ssl = None
        if self.ssl_views:
            generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
            picked = rng.choice(len(self.sentences), size=min(self.settings.ssl_texts, len(self.sentences)),
                                replace=False)
            sentences = [self.sentences[r] for r in picked]
            texts = self.tokenizer.encode_words(sentences)
            mlm_x, mlm_y = mlm_view(texts, self.settings.mlm_prob, self.tokenizer.vocab_size, generator)
            p = self.settings.word_dropout
            if p:
                x1, x2 = (self.tokenizer.encode_words([_drop_words(s, p, rng) for s in sentences]) for _ in range(2))
            else:
                x1, x2 = texts, texts.clone()
            ssl = (x1, x2, mlm_x, mlm_y)
        return make_record(index, "smlmt", episode_seed(self.seed, index), episode, 0, ssl)

    def word_of(self, index: int) -> list[str]:
        """The words episode `index` masks, in label order (for reports and tests)."""
        rng = np.random.default_rng([self.seed, check_int("episode index", index, 0)])
        return [self.words[j] for j in rng.choice(len(self.words), size=self.n_way, replace=False)]


def _drop_words(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """`words` with each dropped with probability `p`; at least one is kept."""
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep) if k]

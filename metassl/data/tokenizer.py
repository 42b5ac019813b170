"""A WordPiece vocabulary learned from the meta-train text (Hugging Face `tokenizers`).

A text becomes an item of shape `[2, L]` int64, `L = max_tokens`: row 0 holds the token ids
`[CLS] w1 ... wn [SEP]` followed by `[PAD]` (id 0), row 1 the attention mask (1 for a real
token, 0 for padding). Rules, the same for every text:

- normalisation: BERT's (lower case, accents stripped, control characters removed,
  CJK characters split), then words and punctuation split apart;
- truncation: a text of more than `L - 2` word pieces keeps its first `L - 2` (counted in
  `TextTokenizer.truncated`); padding: every item is exactly `L` long;
- refused (DataError naming the text's position): a text that is not a string, longer than
  MAX_TEXT_CHARS characters, or with no token after normalisation (empty or only spaces).

Special tokens have fixed ids: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4.

Training a WordPiece vocabulary is not reproducible across processes (`tokenizers` breaks
frequency ties differently each time), so a run trains it once, saves it as
`RUN/tokenizer.json` and every process of the run loads that file (`tokenizer_stage`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from metassl.errors import ConfigError, DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
MAX_TEXT_CHARS = 10_000  # longer "texts" are not utterances: refused rather than tokenised
MIN_TOKENS = 4  # [CLS], [SEP] and room for two word pieces
MAX_TOKENIZER_BYTES = 64 * 2**20


class TextTokenizer:
    """Encodes texts as `[N, 2, max_tokens]` int64 items (ids, attention mask); see the module doc."""

    def __init__(self, tokenizer, max_tokens: int):
        from tokenizers.processors import TemplateProcessing

        if max_tokens < MIN_TOKENS:
            raise ConfigError(f"data.max_tokens={max_tokens} must be at least {MIN_TOKENS}")
        vocab = tokenizer.get_vocab()
        wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if vocab.get(t) != i]
        if wrong:
            raise DataError(f"tokenizer: special tokens {wrong} do not have the ids {list(SPECIAL_TOKENS)} "
                            "expect (0, 1, 2, ...): not a metassl tokenizer")
        self.max_tokens = int(max_tokens)
        tokenizer.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
            ("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
        tokenizer.enable_truncation(self.max_tokens)
        tokenizer.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", length=self.max_tokens)
        self._tok = tokenizer
        self.truncated = 0  # texts cut to max_tokens so far

    # --- building and storing ----------------------------------------------------------
    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, max_tokens: int) -> TextTokenizer:
        """A WordPiece vocabulary of at most `vocab_size` pieces learned from `texts`."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        texts = [_checked(t, i) for i, t in enumerate(texts)]
        if not texts:
            raise DataError("cannot learn a vocabulary from no text: the meta-train split is empty")
        if vocab_size < len(SPECIAL_TOKENS) + 26:
            raise ConfigError(f"data.vocab_size={vocab_size} is too small (at least {len(SPECIAL_TOKENS) + 26})")
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                            show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok, max_tokens)

    @classmethod
    def from_json(cls, text: str, max_tokens: int, where: str = "tokenizer") -> TextTokenizer:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception type on bad JSON
            raise DataError(f"{where} is not a tokenizer file ({' '.join(str(e).split())[:200]})") from None
        return cls(tok, max_tokens)

    @classmethod
    def load(cls, path: str | Path, max_tokens: int) -> TextTokenizer:
        path = Path(path)
        try:
            if path.stat().st_size > MAX_TOKENIZER_BYTES:
                raise DataError(f"tokenizer {str(path)!r} is larger than {MAX_TOKENIZER_BYTES} bytes")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"tokenizer {str(path)!r} cannot be read ({getattr(e, 'strerror', None) or e})") from None
        return cls.from_json(text, max_tokens, f"tokenizer {str(path)!r}")

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    # --- using -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def words(self, text: str) -> list[str]:
        """The normalised words of `text` (what a masked-word task masks), in order."""
        normal = self._tok.normalizer.normalize_str(text)
        return [w for w, _ in self._tok.pre_tokenizer.pre_tokenize_str(normal)]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """`[N, 2, max_tokens]` int64: token ids and attention masks of `texts` (see the module doc)."""
        texts = [_checked(t, i) for i, t in enumerate(texts)]
        return self._items(self._tok.encode_batch(texts), texts)

    def encode_words(self, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
        """Like `encode`, for texts already split into words (a word "[MASK]" is the mask token)."""
        return self._items(self._tok.encode_batch([list(s) for s in sentences], is_pretokenized=True), sentences)

    def kept_words(self, sentences: Sequence[Sequence[str]]) -> list[int]:
        """For each sentence (a list of words), how many of its first words survive truncation."""
        encodings = self._tok.encode_batch([list(s) for s in sentences], is_pretokenized=True)
        return [max((w for w in e.word_ids if w is not None), default=-1) + 1 for e in encodings]

    def decode(self, ids: Sequence[int], keep_mask: bool = True) -> str:
        """The text of token ids (padding dropped; [MASK] kept when `keep_mask`)."""
        ids = [int(i) for i in ids if int(i) != PAD_ID]
        if not keep_mask:
            return self._tok.decode(ids)
        pieces, out = [], []
        for i in ids + [MASK_ID]:  # a sentinel flushes the last run of pieces
            if i == MASK_ID:
                if pieces:
                    out.append(self._tok.decode(pieces))
                    pieces = []
                out.append("[MASK]")
            elif i not in (CLS_ID, SEP_ID):
                pieces.append(i)
        return " ".join(p for p in out[:-1] if p)

    def _items(self, encodings, texts) -> torch.Tensor:
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64).reshape(len(encodings), self.max_tokens)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64).reshape(ids.shape)
        for i, e in enumerate(encodings):
            if int(mask[i].sum()) <= 2:  # [CLS] [SEP] only
                raise DataError(f"text {i} ({_preview(texts[i])}) has no token after normalisation; "
                                "empty texts cannot be classified")
        self.truncated += sum(1 for e in encodings if e.overflowing)
        return torch.stack([ids, mask], dim=1)


def check_items(x: torch.Tensor, vocab_size: int, where: str) -> None:
    """DataError unless `x` `[..., 2, L]` holds ids in 0..vocab_size-1 and every item has a token.

    For items that did not come from this run's tokenizer (episodes read from shards)."""
    ids, mask = x[..., 0, :], x[..., 1, :]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise DataError(f"{where}: token ids {int(ids.min())}..{int(ids.max())} are outside the vocabulary of "
                        f"{vocab_size} (data.vocab_size): these texts were encoded with another vocabulary")
    if ids.numel() and (int(mask.sum(-1).min()) == 0 or not bool(((mask == 0) | (mask == 1)).all())):
        raise DataError(f"{where}: an item has no token, or its attention mask is not 0/1")


def _checked(text, index: int) -> str:
    if not isinstance(text, str):
        raise DataError(f"text {index} is a {type(text).__name__}, not a string")
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(f"text {index} is {len(text)} characters long; at most {MAX_TEXT_CHARS} (one utterance "
                        "or sentence per item)")
    if not text.strip():
        raise DataError(f"text {index} is empty; every item needs some text")
    return text


def _preview(text) -> str:
    shown = json.dumps(text if isinstance(text, str) else " ".join(map(str, text)))
    return shown if len(shown) <= 60 else shown[:57] + '..."'

"""Tokenizers: captions → a LongTensor (N, model.context_length) of ids, 0 = padding.

- hash: lower-cased words hashed into `vocab_size − 1` ids; no vocabulary file, no training.
- bpe: a byte-level BPE (Hugging Face `tokenizers`) trained once on a sample of the training
  captions and kept as a tokenizer.json, so a resumed trial and every data-parallel rank read the
  same vocabulary.
- file: any tokenizer.json in the `tokenizers` format, e.g. CLIP's or SigLIP's.

A caption longer than the context is cut, keeping the special tokens the tokenizer wraps text in
(its end-of-text token stays last, where `text_pool=eot` reads; see `models.eot_index`).

The loop tokenizes every step's captions. A file or BPE tokenizer encodes each distinct caption
once and answers a batch with one `index_select` into a table of cached rows (zero-shot prompts
are fixed; real datasets repeat captions). The hash tokenizer caches words instead: the shapes
captions combine enough attributes that almost every one is new (47,481 distinct in 48,000 at
B = 16), so a row cache would pay for storing rows it never reads again.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizerFile
from tokenizers.models import BPE

from scalestudy.spec import ModelSpec
from scalestudy.store.files import atomic_write

# Rows (distinct captions) cached before the table starts over: 65,536 × 77 ids × 8 bytes ≈ 40 MB at
# CLIP's context, and far more than the shapes data's few hundred captions.
CACHE_ROWS = 1 << 16
WORD = re.compile(r"[a-z0-9]+")
# Ids 0, 1, 2 of a trained BPE; 0 doubles as the padding every tokenizer here pads with.
BPE_SPECIAL_TOKENS = ("<pad>", "<start_of_text>", "<end_of_text>")


class Tokenizer(Protocol):
    vocab_size: int
    context_length: int
    eot_id: int | None  # the end-of-text id appended to every caption; None if there is none

    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


def padded_rows(rows: Sequence[list[int]], length: int) -> torch.Tensor:
    """(len(rows), length) ids, each row (already cut to `length`) padded with 0."""
    return torch.tensor([ids + [0] * (length - len(ids)) for ids in rows],
                        dtype=torch.long).view(len(rows), length)


class RowCache:
    """Encodes each distinct caption once into a zero-padded row; a batch is one index_select.

    `encode` maps captions to id lists already cut to `context_length`. After `capacity` distinct
    captions the table starts over (a real dataset rarely repeats a caption within an epoch).
    """

    def __init__(
        self, encode: Callable[[list[str]], list[list[int]]], context_length: int,
        capacity: int = CACHE_ROWS,
    ) -> None:
        self._encode = encode
        self._length = context_length
        self._capacity = capacity
        self._rows: dict[str, int] = {}
        self._table = torch.zeros(64, context_length, dtype=torch.long)

    def _padded(self, texts: list[str]) -> torch.Tensor:
        return padded_rows(self._encode(texts), self._length)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        rows = self._rows
        missing = [text for text in dict.fromkeys(texts) if text not in rows]
        if missing:
            if len(rows) + len(missing) > self._capacity:
                rows.clear()
                missing = list(dict.fromkeys(texts))
                if len(missing) > self._capacity:
                    return self._padded(list(texts))
            start = len(rows)
            if start + len(missing) > len(self._table):
                grown = torch.zeros(
                    min(self._capacity, max(2 * len(self._table), start + len(missing))),
                    self._length, dtype=torch.long,
                )
                grown[:start] = self._table[:start]
                self._table = grown
            self._table[start : start + len(missing)] = self._padded(missing)
            rows.update(zip(missing, range(start, start + len(missing))))
        return self._table.index_select(0, torch.tensor([rows[text] for text in texts]))


class HashTokenizer:
    """Lower-cased words ([a-z0-9]+) hashed (crc32, stable across processes) into ids
    1 … vocab_size − 1; the first `context_length` words are kept.

    Needs no vocabulary file or download; 0 is padding. Collisions are rare at a few thousand
    buckets for caption vocabularies of a few hundred words.
    """

    eot_id = None

    def __init__(self, vocab_size: int, context_length: int) -> None:
        self.vocab_size = vocab_size
        self.context_length = context_length
        self._ids: dict[str, int] = {}

    def _id(self, word: str) -> int:
        if len(self._ids) >= CACHE_ROWS:
            self._ids.clear()
        self._ids[word] = 1 + zlib.crc32(word.encode()) % (self.vocab_size - 1)
        return self._ids[word]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        keep, known = self.context_length, self._ids.get
        words = (WORD.findall(text.lower())[:keep] for text in texts)
        return padded_rows([[known(word) or self._id(word) for word in row] for row in words], keep)


class FileTokenizer:
    """A Hugging Face `tokenizers` tokenizer: cut to the context (its special tokens kept) and
    padded with id 0, whatever padding the file itself names."""

    def __init__(self, tokenizer: HFTokenizerFile, context_length: int) -> None:
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.context_length = context_length
        tokenizer.no_padding()
        # max_length counts the special tokens the post-processor adds, so they survive the cut.
        tokenizer.enable_truncation(max_length=context_length)
        wrapped = tokenizer.encode("").ids
        self.eot_id = wrapped[-1] if tokenizer.num_special_tokens_to_add(False) and wrapped else None
        self._tokenizer = tokenizer
        self._rows = RowCache(self._encode, context_length)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch_fast(texts)]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self._rows(texts)


def check_tokenizer_file(path: str | os.PathLike[str], vocab_size: int, context_length: int) -> None:
    """Raise ValueError naming the problem if `path` is not a tokenizer.json the model can use."""
    where = f"model.tokenizer_file={os.fspath(path)}"
    if not os.path.isfile(path):
        raise ValueError(
            f"{where} does not exist; give the path of a tokenizer.json (Hugging Face tokenizers "
            "format, e.g. CLIP's or SigLIP's)"
        )
    try:
        tokenizer = HFTokenizerFile.from_file(os.fspath(path))
    except Exception as err:  # tokenizers raises a bare Exception for any unreadable file
        raise ValueError(f"{where} is not a readable tokenizer.json: {err}") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != vocab_size:
        raise ValueError(
            f"{where} has a vocabulary of {size} tokens but model.vocab_size={vocab_size}; set "
            f"model.vocab_size={size} so every id has an embedding"
        )
    special = tokenizer.num_special_tokens_to_add(False)
    if context_length <= special:
        raise ValueError(
            f"model.context_length={context_length} leaves no room for text after the {special} "
            f"special tokens {where} adds to every caption; raise model.context_length"
        )


def load_tokenizer_file(
    path: str | os.PathLike[str], vocab_size: int, context_length: int
) -> FileTokenizer:
    check_tokenizer_file(path, vocab_size, context_length)
    return FileTokenizer(HFTokenizerFile.from_file(os.fspath(path)), context_length)


def train_bpe(captions: Iterable[str], vocab_size: int) -> HFTokenizerFile:
    """A byte-level BPE of at most `vocab_size` tokens: ids 0–2 are <pad>, <start_of_text>,
    <end_of_text>, then the 256 byte tokens, then merges. Text is lower-cased with runs of
    whitespace made one space (CLIP §2.4 uses a lower-cased BPE and cleans whitespace), and every caption is wrapped
    in start and end tokens so `text_pool=eot` reads the end token (CLIP §2.4 brackets text with
    [SOS] and [EOS] and reads the [EOS] activation)."""
    tokenizer = HFTokenizerFile(BPE())
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
    ])
    # A prefix space makes a word the same token at the start of a caption as inside it.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer)
    start, end = BPE_SPECIAL_TOKENS[1:]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}", special_tokens=[(start, 1), (end, 2)]
    )
    return tokenizer


def bpe_tokenizer(
    path: str | os.PathLike[str], captions: Callable[[], Iterable[str]], vocab_size: int,
    context_length: int,
) -> FileTokenizer:
    """The BPE tokenizer kept at `path`, trained on `captions()` first if the file is missing.

    The file appears whole or not at all (written to a temporary name, then renamed), so a
    resumed trial or another rank never reads half of it; training is deterministic, so two
    ranks that both train write the same file.
    """
    path = Path(path)
    if not path.exists():
        trained = train_bpe(captions(), vocab_size)
        atomic_write(path, lambda tmp: trained.save(os.fspath(tmp)))
    tokenizer = HFTokenizerFile.from_file(os.fspath(path))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ValueError(
            f"the BPE tokenizer {path} has {size} tokens, more than model.vocab_size={vocab_size}; "
            "delete it to train a new one, or raise model.vocab_size"
        )
    return FileTokenizer(tokenizer, context_length)


def make_tokenizer(
    spec: ModelSpec,
    bpe_file: str | os.PathLike[str] | None = None,
    captions: Callable[[], Iterable[str]] | None = None,
) -> Tokenizer:
    """The tokenizer `model.tokenizer` names; bpe needs where its file lives and, to train it, a
    sample of training captions."""
    if spec.tokenizer == "hash":
        return HashTokenizer(spec.vocab_size, spec.context_length)
    if spec.tokenizer == "file":
        assert spec.tokenizer_file is not None  # the spec requires it with tokenizer=file
        return load_tokenizer_file(spec.tokenizer_file, spec.vocab_size, spec.context_length)
    if bpe_file is None or captions is None:
        raise ValueError("model.tokenizer=bpe needs the path of its tokenizer file and the captions "
                         "to train it on")
    return bpe_tokenizer(bpe_file, captions, spec.vocab_size, spec.context_length)

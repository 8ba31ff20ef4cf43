"""Tokenizers give the ids their definition says, pad with 0, keep the end-of-text token when they
cut a caption, and a BPE is trained once and then read back from its file."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizerFile
from tokenizers import pre_tokenizers, processors
from tokenizers.models import WordLevel

from scalestudy.spec import ModelSpec
from scalestudy.train.models import eot_index
from scalestudy.train.tokenizers import (
    BPE_SPECIAL_TOKENS, FileTokenizer, HashTokenizer, RowCache, bpe_tokenizer, check_tokenizer_file,
    load_tokenizer_file, make_tokenizer,
)

WORDS = ["a", "photo", "of", "the", "red", "green", "blue", "small", "large", "circle", "square",
         "triangle", "drawn", "on", "white", "background", "with", "two", "dogs", "running"]
CAPTIONS = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(1 + i % 9))
            for i in range(400)]


def naive_hash(texts: list[str], vocab_size: int, context_length: int) -> torch.Tensor:
    """The hash tokenizer's definition, one caption and one word at a time."""
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        words = "".join(c if c.isascii() and c.isalnum() else " " for c in text.lower()).split()
        for col, word in enumerate(words[:context_length]):
            out[row, col] = 1 + zlib.crc32(word.encode()) % (vocab_size - 1)
    return out


caption_text = st.text(alphabet="abcXYZ019 ,.!é-", max_size=40)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(caption_text, min_size=1, max_size=12), vocab=st.integers(2, 5000),
       context=st.integers(1, 10))
def test_hash_tokenizer_hashes_lower_cased_words_with_crc32(
    texts: list[str], vocab: int, context: int
) -> None:
    tokens = HashTokenizer(vocab, context)(texts)
    assert torch.equal(tokens, naive_hash(texts, vocab, context))


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.sampled_from(CAPTIONS[:30]), min_size=1, max_size=9),
                        min_size=1, max_size=6),
       capacity=st.integers(1, 12))
def test_cached_rows_answer_repeated_and_new_captions_as_a_fresh_encoding_would(
    batches: list[list[str]], capacity: int
) -> None:
    # A tiny capacity makes the table start over mid-sequence, and batches outgrow it.
    def encode(texts: list[str]) -> list[list[int]]:  # ids ≥ 1: the zeros are padding
        return [[i for i in row if i] for row in naive_hash(texts, 512, 6).tolist()]

    cached = RowCache(encode, 6, capacity=capacity)
    for batch in batches:
        assert torch.equal(cached(batch), naive_hash(batch, 512, 6))


def test_a_caption_longer_than_the_context_keeps_its_first_words() -> None:
    tokens = HashTokenizer(4096, 3)(["one two three four five"])
    assert torch.equal(tokens, naive_hash(["one two three"], 4096, 3))


@pytest.fixture
def bpe_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "tokenizer.json"


def test_bpe_trains_once_and_every_later_call_reads_the_same_file(bpe_path: Path) -> None:
    bpe_path.parent.mkdir()
    calls = []

    def sample() -> list[str]:
        calls.append(1)
        return CAPTIONS

    first = bpe_tokenizer(bpe_path, sample, 300, 12)
    assert calls == [1] and bpe_path.is_file()
    assert [p.name for p in bpe_path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left

    def must_not_train() -> list[str]:
        raise AssertionError("the tokenizer file exists; it must be loaded, not trained again")

    again = bpe_tokenizer(bpe_path, must_not_train, 300, 12)
    assert torch.equal(first(CAPTIONS[:50]), again(CAPTIONS[:50]))


def test_bpe_training_is_deterministic_so_racing_ranks_write_the_same_file(tmp_path: Path) -> None:
    bpe_tokenizer(tmp_path / "a.json", lambda: CAPTIONS, 300, 12)
    bpe_tokenizer(tmp_path / "b.json", lambda: CAPTIONS, 300, 12)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_bpe_learns_at_most_vocab_size_tokens_and_wraps_captions_in_special_tokens(
    bpe_path: Path,
) -> None:
    bpe_path.parent.mkdir()
    # 20 distinct words run out of merges before 1,000 tokens: the vocabulary stops short.
    tokenizer = bpe_tokenizer(bpe_path, lambda: CAPTIONS, 1000, 16)
    tokens = tokenizer(CAPTIONS)
    assert tokenizer.vocab_size < 1000 and int(tokens.max()) < tokenizer.vocab_size
    assert tokenizer.eot_id == BPE_SPECIAL_TOKENS.index("<end_of_text>")
    assert (tokens[:, 0] == BPE_SPECIAL_TOKENS.index("<start_of_text>")).all()
    # Whole words the sample repeats become single tokens, spelled the same at any position.
    first, inside = tokenizer(["circle", "a red circle"]).tolist()
    assert first[1] == inside[3] and first[2] == tokenizer.eot_id


def test_bpe_lowercases_and_collapses_whitespace(bpe_path: Path) -> None:
    bpe_path.parent.mkdir()
    tokenizer = bpe_tokenizer(bpe_path, lambda: CAPTIONS, 300, 16)
    assert torch.equal(tokenizer(["  A   Red\tCircle "]), tokenizer(["a red circle"]))


def test_a_bpe_file_larger_than_the_model_vocabulary_is_refused(bpe_path: Path) -> None:
    bpe_path.parent.mkdir()
    bpe_tokenizer(bpe_path, lambda: CAPTIONS, 300, 12)
    with pytest.raises(ValueError, match="more than model.vocab_size=280"):
        bpe_tokenizer(bpe_path, lambda: CAPTIONS, 280, 12)


def clip_like_file(path: Path, start: str = "<|startoftext|>", end: str = "<|endoftext|>") -> int:
    """A word-level tokenizer.json laid out like CLIP's: id 0 is a real token ("!"), the start
    and end tokens are the last two ids. Returns the vocabulary size."""
    vocab = {"!": 0, **{word: i + 1 for i, word in enumerate(WORDS)}, "[UNK]": len(WORDS) + 1}
    vocab[start], vocab[end] = len(vocab), len(vocab) + 1
    tokenizer = HFTokenizerFile(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}", special_tokens=[(start, vocab[start]), (end, vocab[end])]
    )
    tokenizer.save(str(path))
    return len(vocab)


@pytest.mark.parametrize("context", [3, 5, 12])
def test_a_caption_cut_to_the_context_keeps_its_end_of_text_token_where_eot_pooling_reads(
    tmp_path: Path, context: int
) -> None:
    size = clip_like_file(tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer_file(tmp_path / "tokenizer.json", size, context)
    texts = ["a photo of two dogs running on the white background with a large red circle", "",
             "red !", "red"]
    tokens = tokenizer(texts)
    assert tokens.shape == (4, context) and tokenizer.eot_id == size - 1
    eot = eot_index(tokens)
    assert (tokens[torch.arange(4), eot] == tokenizer.eot_id).all()
    assert tokens[0, -1] == tokenizer.eot_id  # the long caption fills the context, end token last
    assert tokens[1].tolist()[:2] == [size - 2, size - 1] and not tokens[1, 2:].any()
    if context >= 4:
        assert tokens[2].tolist()[:4] == [size - 2, WORDS.index("red") + 1, 0, size - 1]


def test_a_file_without_an_end_token_has_no_eot_id(tmp_path: Path) -> None:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    tokenizer = HFTokenizerFile(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "plain.json"))
    loaded = load_tokenizer_file(tmp_path / "plain.json", len(vocab), 4)
    assert loaded.eot_id is None
    assert loaded(["red circle", "a photo of two dogs"]).tolist() == [
        [vocab["red"], vocab["circle"], 0, 0], [vocab["a"], vocab["photo"], vocab["of"], vocab["two"]]]


def test_check_tokenizer_file_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model.tokenizer_file=.*nope.json does not exist"):
        check_tokenizer_file(tmp_path / "nope.json", 100, 16)


def test_check_tokenizer_file_names_an_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"model": "not a tokenizer"}))
    with pytest.raises(ValueError, match="is not a readable tokenizer.json"):
        check_tokenizer_file(tmp_path / "bad.json", 100, 16)


def test_check_tokenizer_file_names_a_vocabulary_that_differs_from_the_model(tmp_path: Path) -> None:
    size = clip_like_file(tmp_path / "tokenizer.json")
    check_tokenizer_file(tmp_path / "tokenizer.json", size, 16)
    with pytest.raises(ValueError, match=f"vocabulary of {size} tokens but model.vocab_size=49408; "
                                         f"set model.vocab_size={size}"):
        check_tokenizer_file(tmp_path / "tokenizer.json", 49408, 16)


def test_check_tokenizer_file_needs_room_for_text_besides_the_special_tokens(tmp_path: Path) -> None:
    size = clip_like_file(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="model.context_length=2 leaves no room"):
        check_tokenizer_file(tmp_path / "tokenizer.json", size, 2)


def test_make_tokenizer_builds_the_kind_the_spec_names(tmp_path: Path) -> None:
    assert isinstance(make_tokenizer(ModelSpec()), HashTokenizer)
    size = clip_like_file(tmp_path / "tokenizer.json")
    spec = ModelSpec(tokenizer="file", tokenizer_file=str(tmp_path / "tokenizer.json"),
                     vocab_size=size)
    assert isinstance(make_tokenizer(spec), FileTokenizer)
    bpe = ModelSpec(tokenizer="bpe", vocab_size=300)
    assert make_tokenizer(bpe, tmp_path / "bpe.json", lambda: CAPTIONS).eot_id == 2
    with pytest.raises(ValueError, match="model.tokenizer=bpe needs the path"):
        make_tokenizer(bpe)

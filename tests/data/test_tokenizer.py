"""The GPT-2 encoding built from the bundled vocabulary."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tiktoken

from conftest import shakespeare_text
from gpt2cli import get_tokenizer
from gpt2cli.data.encoding import read_chunks
from gpt2cli.data.tokenizer import EOT_ID, VOCAB_SIZE, Tokenizer
from gpt2cli.errors import Gpt2Error


def test_published_facts():
    tokenizer = get_tokenizer()
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("<|endoftext|>", allow_special=True) == [50256]
    assert tokenizer.encode("<|endoftext|>") != [50256]  # plain text unless asked for
    assert tokenizer.vocab_size == VOCAB_SIZE == tokenizer.encoding.n_vocab == 50257
    assert tokenizer.eot_id == EOT_ID == 50256
    assert get_tokenizer() is tokenizer


def test_round_trip_on_shakespeare():
    tokenizer = get_tokenizer()
    text = shakespeare_text()
    ids = tokenizer.encode(text)
    assert len(ids) > 1_500_000
    assert tokenizer.decode(ids) == text
    assert np.array_equal(tokenizer.encode_to_numpy(text), np.array(ids, dtype=np.uint32))


@pytest.mark.parametrize("text", ["  leading spaces", "tabs\tand\r\nCRLF", "emoji 🤖🎉 done", "ünïcödé  \n\n\nend"])
def test_round_trip_edge_cases(text):
    tokenizer = get_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_corrupt_vocabulary_is_refused(monkeypatch):
    monkeypatch.setattr("gpt2cli.data.tokenizer.VOCAB_SHA256", "0" * 64)
    with pytest.raises(Gpt2Error, match="corrupt"):
        Tokenizer()


def test_never_touches_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.setattr("socket.socket.connect", no_network)
    assert Tokenizer().encode("Hello world") == [15496, 995]


def test_chunked_encoding_equals_whole_text_encoding():
    """The parallel pipeline cuts text only where GPT-2's pre-tokenizer cannot span the cut."""
    tokenizer = get_tokenizer()
    rng = np.random.default_rng(0)
    pieces = ["word", " ", "  ", "\n", "\n\n", " \n", "\r\n", "x", "'ll", "'s", "42", "é", "\u00a0", "\t", "!?", " the"]
    text = "".join(rng.choice(pieces, size=50_000)) + shakespeare_text()[:200_000]
    data = text.encode()
    chunks = list(read_chunks(io.BytesIO(data), jsonl=False, chunk_bytes=97))
    assert len(chunks) > 100
    assert b"".join(chunk for _, chunk in chunks) == data
    joined = np.concatenate([tokenizer.encode_to_numpy(chunk.decode()) for _, chunk in chunks])
    assert np.array_equal(joined, tokenizer.encode_to_numpy(text))

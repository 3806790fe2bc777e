"""The GPT-2 byte-pair encoding, built offline from the vocabulary shipped in the package."""

from __future__ import annotations

import binascii
import hashlib
import importlib.resources
from functools import lru_cache
from typing import TYPE_CHECKING

import tiktoken

from gpt2cli.errors import Gpt2Error

if TYPE_CHECKING:
    from collections.abc import Iterable

    import numpy as np

VOCAB_FILE = "gpt2.tiktoken"
# tiktoken checks the same hash for its r50k_base file: a changed vocabulary would silently corrupt data.
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TEXT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, each optionally after one space.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _load_ranks() -> dict[bytes, int]:
    raw = importlib.resources.files("gpt2cli.assets").joinpath(VOCAB_FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VOCAB_SHA256:
        raise Gpt2Error(f"bundled vocabulary {VOCAB_FILE} is corrupt (sha256 {digest}); reinstall gpt2cli")
    fields = raw.split()  # "token rank" per line; binascii skips base64's per-call wrappers (start-up time)
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2]), strict=True))


class Tokenizer:
    """GPT-2's encoding: 50,257 tokens, `<|endoftext|>` = 50256."""

    eot_id = EOT_ID
    eot_text = EOT_TEXT
    vocab_size = VOCAB_SIZE

    def __init__(self) -> None:
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=_load_ranks(),
            special_tokens={EOT_TEXT: EOT_ID},
            explicit_n_vocab=VOCAB_SIZE,
        )
        # tiktoken initialises shared regex state lazily; threads that start encoding at the same time on a cold
        # encoder each run about twice as slowly (measured: 2.6 s instead of 1.2 s of CPU for 20 MB). One tiny
        # encode here, before any worker thread or forked process exists, avoids that.
        self.encoding.encode_ordinary("Warm up: 1, 2, 3...\n  it's done.")

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; `<|endoftext|>` in the text is plain text unless `allow_special`."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_to_numpy(self, text: str, *, allow_special: bool = False) -> np.ndarray:
        """Like `encode`, as a uint32 array without building a Python list (and without holding the GIL)."""
        allowed = "all" if allow_special else set()
        return self.encoding.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids: Iterable[int], *, errors: str = "replace") -> str:
        return self.encoding.decode(list(ids), errors=errors)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared GPT-2 tokenizer (built once per process, never from the network)."""
    return Tokenizer()

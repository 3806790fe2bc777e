"""GPT-2's tokenizer as files other tools read: transformers' vocab.json + merges.txt, and the lists GGUF embeds.

Both need the token strings (GPT-2's byte-to-character map) and the ranked merges, which tiktoken's ranks do not
list: they are recovered here from the bundled vocabulary.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from gpt2cli.data.tokenizer import EOT_TEXT, get_tokenizer
from gpt2cli.errors import CheckpointError
from gpt2cli.formats.chat_template import TEMPLATE_FILE


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (as its original encoder.py defines it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _as_text(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[byte] for byte in token)


@cache
def vocabulary_and_merges() -> tuple[list[str], list[tuple[str, str]]]:
    """Token strings by id and the ranked merges, recovered from the bundled tiktoken ranks.

    The merge that creates the token of rank r is the split byte-pair encoding finds using only ranks below r.
    """
    ranks = get_tokenizer().encoding._mergeable_ranks
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    tokens = [_as_text(token) for token, _ in by_rank] + [EOT_TEXT]
    merges = []
    for token, rank in by_rank:
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(
                (ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)
            )  # lowest-ranked adjacent pair below this token's own rank
            if best[0] >= rank:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise CheckpointError(f"cannot recover the merge for token {rank}")
        merges.append((_as_text(parts[0]), _as_text(parts[1])))
    return tokens, merges


def write_tokenizer_files(folder: Path, context: int, chat_template: str | None = None) -> None:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json for transformers' GPT-2 tokenizer;
    a chat template goes into tokenizer_config.json (older transformers) and chat_template.jinja (transformers 5)."""
    tokens, merges = vocabulary_and_merges()
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "tokenizer_class": "GPT2Tokenizer", "model_max_length": context, "add_prefix_space": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
        (folder / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")

"""One sequence's growing text: UTF-8 across token boundaries, stop strings, held-back streaming, and the rule
that takes each new token (end of text, a stop string, the length limit)."""

from __future__ import annotations

import codecs
from collections.abc import Callable

from gpt2cli.data.tokenizer import EOT_ID, Tokenizer
from gpt2cli.generation.records import Completion, SamplingOptions


class TextTracker:
    """Incremental text of one sequence: UTF-8 across token boundaries, stop strings, held-back streaming."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1  # chars that may start a stop string
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string appeared (the text is then cut just before it)."""
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        for stop in self.stops:
            found = self.text.find(stop, max(0, self.emitted - len(stop)))
            if found >= 0:
                self.text = self.text[:found]
                return True
        return False

    def finish(self) -> None:
        self.text += self.decoder.decode(b"", final=True)

    def ready(self, final: bool) -> str:
        """Text that can be shown now: everything but a tail that could still become a stop string."""
        limit = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        piece = self.text[self.emitted : limit]
        self.emitted = limit
        return piece


def accept_token(
    completion: Completion,
    tracker: TextTracker,
    token: int,
    generated: int,
    options: SamplingOptions,
    on_text: Callable[[int, str], None] | None,
    row: int,
) -> bool:
    """Record one new token of a sequence (the `generated`-th, from 0); False once the sequence is finished."""
    if token == EOT_ID and not options.ignore_eot:
        completion.finish_reason = "eot"
    elif tracker.add(token):
        completion.token_ids.append(token)
        completion.finish_reason = "stop"
    else:
        completion.token_ids.append(token)
        if generated + 1 == options.max_new_tokens:
            completion.finish_reason = "length"
    finished = completion.finish_reason is not None
    if finished:
        tracker.finish()
    if on_text is not None:
        piece = tracker.ready(final=finished)
        if piece:
            on_text(row, piece)
    return not finished

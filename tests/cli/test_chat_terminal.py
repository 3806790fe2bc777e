"""`gpt2 chat` on a real terminal: a process whose controlling terminal is a pty. A message gets a streamed reply,
Ctrl-C stops that reply and keeps the session, Ctrl-D leaves with exit code 0."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import biased_model, cli_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal"),
]

CTRL_C, CTRL_D = b"\x03", b"\x04"


class Terminal:
    """A child process on the slave side of a pty (its controlling terminal); we type and read on the master."""

    def __init__(self, *args: str) -> None:
        import fcntl
        import pty
        import termios

        self.master, slave = pty.openpty()

        def take_the_terminal() -> None:  # a new session whose controlling terminal is the pty: ^C sends SIGINT
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpt2cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=cli_env(OMP_NUM_THREADS="1", TERM="dumb"),
            preexec_fn=take_the_terminal,
        )
        os.close(slave)
        self.output = b""

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def read_until(self, expected: bytes, start: int = 0, timeout: float = 120.0) -> int:
        """Read until `expected` appears after offset `start`; the offset just past it."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(expected, start)) < 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {expected!r} on the terminal:\n{self.output.decode(errors='replace')}")
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    if self.process.poll() is not None:
                        raise AssertionError(f"exited before {expected!r}:\n{self.output.decode()}") from None
        return found + len(expected)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.master)


def test_ctrl_c_stops_the_reply_and_ctrl_d_leaves(tmp_path: Path):
    from gpt2cli.formats.chat_template import CHAT_TEMPLATE_METADATA_KEY, ChatTemplate

    the = 262  # the model says " the" forever: a reply that only Ctrl-C ends
    checkpoint = biased_model(
        tmp_path / "chatty.safetensors", {the}, metadata={CHAT_TEMPLATE_METADATA_KEY: ChatTemplate.default().source}
    )
    terminal = Terminal("chat", str(checkpoint), "--max-new-tokens", "1000000")
    try:
        seen = terminal.read_until(b"> ")
        terminal.type(b"hello\r")
        seen = terminal.read_until(b" the the the the the", seen)  # the reply streams in
        terminal.type(CTRL_C)
        seen = terminal.read_until(b"(stopped)", seen)
        seen = terminal.read_until(b"> ", seen)  # still in the session
        terminal.type(b"/temperature 0.5\r")
        seen = terminal.read_until(b"temperature 0.5", seen)
        seen = terminal.read_until(b"> ", seen)
        terminal.type(CTRL_D)
        assert terminal.process.wait(timeout=30) == 0, terminal.output.decode()
        assert b"Traceback" not in terminal.output
    finally:
        terminal.close()

"""Every link and command in the docs must work: relative links resolve to a file (and a heading, for `#anchor`
links), and every `gpt2 ...` line in a code block names a real command whose `--help` lists each flag it uses."""

from __future__ import annotations

import itertools
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli

DOCS = sorted((REPO / "docs").glob("*.md"))
COMMAND_PAGES = [REPO / "README.md", *DOCS]  # pages whose code blocks are checked for `gpt2` invocations
LINK_PAGES = [*COMMAND_PAGES, REPO / "benchmarks" / "README.md"]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "text"}  # a block of another language (python, toml) is not run
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>|]*>")


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def split_page(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The prose lines of a markdown page, and its fenced code blocks as (info string, lines)."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    fence: str | None = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            blocks.append((line.strip()[3:].strip().split(" ")[0].lower(), []))
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is not None:
            blocks[-1][1].append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors GitHub gives a page's headings (a repeated heading gets -1, -2, ...)."""
    prose, _ = split_page(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def relative_links(path: Path) -> list[str]:
    """The link and image targets in a page's prose (not in code), other than web addresses."""
    prose, _ = split_page(path.read_text(encoding="utf-8"))
    targets = []
    for line in prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                targets.append(target)
    return targets


def link_problem(page: Path, target: str) -> str | None:
    """Why a relative link from `page` does not resolve, or None."""
    file_part, _, anchor = target.partition("#")
    destination = (page.parent / file_part).resolve() if file_part else page
    if not destination.exists():
        return f"{target}: no such file {destination}"
    if anchor:
        if destination.suffix != ".md":
            return f"{target}: an anchor into a file that is not markdown"
        if anchor not in anchors(destination):
            return f"{target}: no heading with the anchor #{anchor} in {page_id(destination)}"
    return None


@pytest.mark.parametrize("page", LINK_PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    problems = [problem for target in links if (problem := link_problem(page, target))]
    assert not problems, "\n".join(problems)


def shell_lines(text: str) -> list[str]:
    """The command lines of a page's shell-like code blocks, backslash continuations joined, prompts stripped."""
    _, blocks = split_page(text)
    lines = []
    for language, block in blocks:
        if language not in SHELL_BLOCKS:
            continue
        pending = ""
        for line in block:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = (pending + line).strip()
            pending = ""
            if line.startswith("$ "):
                line = line[2:]
            elif language in ("console", "text"):
                continue  # output, not a command
            if line:
                lines.append(line)
    return lines


def invocations(line: str) -> list[tuple[str, ...]]:
    """Each `gpt2 ...` call on a shell line (`python -m gpt2cli ...` and `torchrun ... -m gpt2cli ...` included),
    as its words after `gpt2`: pipes, `&&` and `;` split calls, redirections and comments are left out."""
    line = PLACEHOLDER.sub("PLACEHOLDER", line)  # `runs/<the run>/model.safetensors` is one word, not a redirection
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True  # with punctuation_chars: words split on spaces and the separators only
    calls: list[tuple[str, ...]] = []
    segment: list[str] = []
    redirected = False
    for word in [*lexer, ";"]:
        if word in SEPARATORS:
            calls.extend(_gpt2_call(segment))
            segment = []
        elif set(word) <= set("<>&"):  # a redirection: it and its file are not the command's words
            redirected = True
        elif redirected:
            redirected = False
        else:
            segment.append(word)
    return calls


def _gpt2_call(words: list[str]) -> list[tuple[str, ...]]:
    """The words after the program when the program is `gpt2` (after `VAR=value` assignments, or launched by
    `torchrun --no-python gpt2` or `-m gpt2cli`); `gpt2` as an argument (a folder named so) is not a call."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    if words and words[0] == "gpt2":
        return [tuple(words[1:])]
    for index, (before, word) in enumerate(itertools.pairwise(words)):
        if (before, word) in (("-m", "gpt2cli"), ("--no-python", "gpt2")):
            return [tuple(words[index + 2 :])]
    return []


def documented_calls() -> dict[str, list[tuple[tuple[str, ...], str]]]:
    """Every `gpt2` call in the README's and docs/' code blocks as (words after `gpt2`, page), by first word (the
    command, or "" for `gpt2 --help` and the like). Parsing only: which words are subcommands is for `--help` to say."""
    found: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for page in COMMAND_PAGES:
        for line in shell_lines(page.read_text(encoding="utf-8")):
            for words in invocations(line):
                first = words[0] if words and not words[0].startswith("-") else ""
                found.setdefault(first, []).append((words, page_id(page)))
    return found


CALLS = documented_calls()


def run_help(path: tuple[str, ...]):
    return run_cli(*path, "--help", env=cli_env(COLUMNS="300"))  # wide: no flag or help line is cut


@cache
def help_text(path: tuple[str, ...]) -> str | None:
    """`gpt2 PATH --help`'s output, or None when PATH is not a command."""
    result = run_help(path)
    return result.stdout.decode() if result.returncode == 0 else None


def command_path(words: tuple[str, ...]) -> tuple[str, ...]:
    """The subcommand words of a call (`sample`, `cache info`, or none for `gpt2 --help`): a word is taken as a
    subcommand while the command so far is a group, and kept even when it is not a command (the test says so)."""
    path: list[str] = []
    for word in words:
        text = help_text(tuple(path))
        if word.startswith("-") or text is None or "COMMAND [ARGS]" not in text:
            break
        path.append(word)
    return tuple(path)


def test_the_docs_show_every_command():
    # the parser found the tour's commands (nothing found would let the next test pass without checking anything)
    expected = {"tokenize", "train", "eval", "sample", "chat", "convert", "bench", "serve", "plot", "cache"}
    assert expected <= set(CALLS), expected - set(CALLS)


@pytest.mark.parametrize("first", sorted(CALLS), ids=lambda first: f"gpt2 {first}".strip())
def test_every_documented_command_and_flag_exists(first):
    flags: dict[tuple[str, ...], dict[str, set[str]]] = {}
    for words, page in CALLS[first]:
        path = command_path(words)
        for word in words[len(path) :]:
            flag = word.split("=", 1)[0]
            if re.fullmatch(r"--[a-z0-9][a-z0-9-]*|-[a-zA-Z]", flag):
                flags.setdefault(path, {}).setdefault(flag, set()).add(page)
        flags.setdefault(path, {})
    problems = []
    for path, used in flags.items():
        usage = " ".join(("gpt2", *path))
        text = help_text(path)
        if text is None:
            problems.append(f"{usage}: not a command ({run_help(path).stderr.decode().strip()})")
            continue
        assert f"Usage: {usage} " in text, text[:400]
        missing = {
            flag: sorted(pages)
            for flag, pages in used.items()
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)
        }
        if missing:
            problems.append(f"{usage}: flags not in --help: {missing}")
    assert not problems, "\n".join(problems)

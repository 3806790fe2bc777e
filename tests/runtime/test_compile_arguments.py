"""Every torch.compile call each device would make, constructed on the CPU build.

Construction is where torch refuses `mode` beside `options`, an unknown Inductor option, one of the wrong type, an
unknown mode or backend: so a mistake in the CUDA (or MPS) branch fails here, on a machine without a GPU. It does
not capture a graph, which only a GPU run proves.

The call sites themselves are found with `ast` in gpt2cli/ and benchmarks/: each must take its arguments as
`**f(...)` from a function of runtime/compile.py that `CONSTRUCTIONS` constructs for every device's rules, so a new
compile call, or a new arguments function, without a construction test fails here.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO
from gpt2cli.runtime import compile as compile_policy
from gpt2cli.runtime.compile import (
    block_compile_arguments,
    decode_compile_arguments,
    default_compile_arguments,
    loss_compile_arguments,
    serve_compile_arguments,
    skip_hook_guards,
)
from gpt2cli.runtime.device_rules import DeviceRules, rules_for

# The devices whose calls are constructed: every CUDA generation the rules tell apart, both CUDA int8 candidates,
# the CPU with and without native bf16, and Apple's MPS.
RULES: dict[str, DeviceRules] = {
    "cuda-7.0": rules_for("cuda", (7, 0)),
    "cuda-8.0": rules_for("cuda", (8, 0)),
    "cuda-9.0": rules_for("cuda", (9, 0)),
    "cuda-9.0-fused-int8": rules_for("cuda", (9, 0), int8_cuda="fused"),
    "cpu": rules_for("cpu"),
    "cpu-bf16": rules_for("cpu", cpu_fast_bf16=True),
    "mps": rules_for("mps"),
}

# Each arguments function of runtime/compile.py -> every set of arguments it can give for a device's rules.
CONSTRUCTIONS: dict[str, Callable[[DeviceRules], list[dict[str, Any]]]] = {
    "block_compile_arguments": lambda rules: [block_compile_arguments(), block_compile_arguments(fullgraph=True)],
    "loss_compile_arguments": lambda rules: [loss_compile_arguments()],
    "default_compile_arguments": lambda rules: [default_compile_arguments()],
    "decode_compile_arguments": lambda rules: [decode_compile_arguments(rules)],
    "serve_compile_arguments": lambda rules: [serve_compile_arguments(rules)],
}


def construct(arguments: dict[str, Any]) -> None:
    """Both kinds of call site with these arguments: `torch.compile(function, ...)` and `Module.compile(...)`.
    (torch.compile pops `guard_filter_fn` out of `options`: each construction gets its own copy.)"""
    for build in (lambda a: torch.compile(lambda x: x + 1, **a), lambda a: torch.nn.Linear(2, 2).compile(**a)):
        build({**arguments, **({"options": dict(arguments["options"])} if "options" in arguments else {})})


@pytest.mark.parametrize("device", RULES)
@pytest.mark.parametrize("function", CONSTRUCTIONS)
def test_every_compile_call_constructs_on_every_device(function: str, device: str) -> None:
    for arguments in CONSTRUCTIONS[function](RULES[device]):
        construct(arguments)


def test_cuda_decoding_records_a_cuda_graph_of_one_shape() -> None:
    for name in ("cuda-7.0", "cuda-8.0", "cuda-9.0", "cuda-9.0-fused-int8"):
        arguments = decode_compile_arguments(RULES[name])
        assert arguments["dynamic"] is False and arguments["options"]["triton.cudagraphs"] is True
        assert "mode" not in arguments  # torch refuses mode together with options
        assert arguments["options"]["guard_filter_fn"] is skip_hook_guards


def test_only_the_fused_int8_candidate_tunes_by_coordinate_descent() -> None:
    tuned = {
        name
        for name, rules in RULES.items()
        if "coordinate_descent_tuning" in decode_compile_arguments(rules)["options"]
    }
    assert tuned == {"cuda-9.0-fused-int8"}


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_other_devices_decode_with_a_dynamic_length(device: str) -> None:
    arguments = decode_compile_arguments(RULES[device])
    assert arguments["dynamic"] is True and "triton.cudagraphs" not in arguments["options"]


def test_a_device_type_alone_gives_its_default_rules() -> None:
    assert decode_compile_arguments("cuda") == decode_compile_arguments(RULES["cuda-9.0"])
    assert decode_compile_arguments("cpu") == decode_compile_arguments(RULES["cpu"])


@pytest.mark.parametrize(
    "arguments",
    [
        # The call that reached main: reduce-overhead's mode beside the options a decode step needs.
        {"mode": "reduce-overhead", "dynamic": False, "options": {"guard_filter_fn": skip_hook_guards}},
        {"options": {"triton.cudagrpahs": True}},  # misspelt
        {"options": {"triton.cudagraphs": "yes"}},  # the wrong type
        {"mode": "reduce_overhead"},
        {"backend": "inductr"},
    ],
)
def test_construction_refuses_what_a_gpu_run_would(arguments: dict[str, Any]) -> None:
    with pytest.raises(Exception, match=r"Either mode or options|Unexpected|Unrecognized mode|Invalid backend"):
        construct(arguments)


# ---------------------------------------------------------------- the call sites


@dataclass(frozen=True)
class CallSite:
    path: str  # relative to the repository
    line: int
    function: str  # the enclosing function ("<module>" at the top level)
    arguments: str | None  # the runtime/compile.py function its `**` arguments come from; None: not so written


def _is_torch_compile(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "compile" and _name(node.value) == "torch"


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _arguments_function(call: ast.Call, positional: int) -> str | None:
    """The name of `f` where the call's arguments are exactly `positional` positional ones and `**f(...)`."""
    if len(call.args) != positional or len(call.keywords) != 1 or call.keywords[0].arg is not None:
        return None
    value = call.keywords[0].value
    return _name(value.func) if isinstance(value, ast.Call) else None


def compile_call_sites(source: str, path: str) -> list[CallSite]:
    """Every torch.compile (called, or used as a decorator or a value) and every `X.compile(...)` of a module in
    `source`; `re.compile` and the like (a receiver named re or regex) are not compile calls."""
    tree = ast.parse(source)
    sites: list[CallSite] = []
    seen_funcs: set[int] = set()

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            scope = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == "compile":
                if _is_torch_compile(child.func):
                    seen_funcs.add(id(child.func))
                    sites.append(CallSite(path, child.lineno, function, _arguments_function(child, 1)))
                elif _name(child.func.value) not in ("re", "regex"):
                    sites.append(CallSite(path, child.lineno, function, _arguments_function(child, 0)))
            elif _is_torch_compile(child) and id(child) not in seen_funcs:  # @torch.compile, f = torch.compile
                sites.append(CallSite(path, child.lineno, function, None))
            visit(child, scope)

    visit(tree, "<module>")
    return sites


def repository_call_sites() -> list[CallSite]:
    paths = sorted([*(REPO / "gpt2cli").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")])
    return [site for path in paths for site in compile_call_sites(path.read_text(), str(path.relative_to(REPO)))]


# What the scan finds today (a new call site must also conform; listing it here is documentation).
KNOWN_CALL_SITES = {
    ("gpt2cli/runtime/compile.py", "compile_blocks", "block_compile_arguments"),
    ("gpt2cli/training/loss.py", "block_kernel", "loss_compile_arguments"),
    ("gpt2cli/generation/generator.py", "compile_decode_step", "decode_compile_arguments"),
    ("gpt2cli/benchmark.py", "_callable", "default_compile_arguments"),
    ("benchmarks/compile_ab.py", "ours_step_factory", "block_compile_arguments"),
    ("benchmarks/compile_ab.py", "ours_step_factory", "default_compile_arguments"),
}


def test_every_compile_call_site_takes_constructed_arguments() -> None:
    sites = repository_call_sites()
    unconstructed = [site for site in sites if site.arguments not in CONSTRUCTIONS]
    assert not unconstructed, (
        "compile calls must pass `**f(...)` with f a runtime/compile.py function that CONSTRUCTIONS constructs "
        f"for every device: {unconstructed}"
    )
    found = {(site.path, site.function, site.arguments) for site in sites}
    assert KNOWN_CALL_SITES - found == set()


def test_every_arguments_function_of_compile_py_is_constructed() -> None:
    tree = ast.parse(Path(compile_policy.__file__).read_text())
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert set(CONSTRUCTIONS) <= defined
    assert {name for name in defined if name.endswith("_compile_arguments")} == set(CONSTRUCTIONS)


SCANNED = """
import re
import torch

PATTERN = re.compile("x")

@torch.compile
def decorated(x): ...

def good(model, step, rules):
    model.compile(**block_compile_arguments())
    return torch.compile(step, **decode_compile_arguments(rules))

def bad(model, step):
    torch.compile(step, mode="reduce-overhead", options={})
    torch.compile(step)
    torch.compile(step, **decode_compile_arguments(rules), fullgraph=True)
    model.compile(options=block_compile_options())
    compiler = torch.compile
"""


def test_the_scan_finds_every_kind_of_compile_call() -> None:
    sites = [(site.line, site.function, site.arguments) for site in compile_call_sites(SCANNED, "x.py")]
    assert sites == [
        (7, "decorated", None),  # a decorator counts in the function it decorates
        (11, "good", "block_compile_arguments"),
        (12, "good", "decode_compile_arguments"),
        (15, "bad", None),
        (16, "bad", None),
        (17, "bad", None),
        (18, "bad", None),
        (19, "bad", None),
    ]

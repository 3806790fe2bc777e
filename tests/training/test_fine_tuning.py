"""Fine-tuning on prompt-completion and messages records: the loss mask, packing, the step's mean, exact resume, the
chat template a run carries, `gpt2 eval` on records, and every bad input the issue lists (#27)."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import assert_one_line_error, cli_env, run_cli
from gpt2cli import get_tokenizer, load_model
from gpt2cli.data.examples import (
    MESSAGES,
    PROMPT_COMPLETION,
    ExampleData,
    ExampleRecipe,
    ExampleSet,
    encode_examples,
    encode_record,
    load_examples,
)
from gpt2cli.formats.chat_template import ChatTemplate, read_chat_template
from gpt2cli.model.gpt2 import GPT2, IGNORE_INDEX, GPT2Config
from gpt2cli.runtime.devices import resolve_precision
from gpt2cli.settings.sections import load_settings
from gpt2cli.training.loss import TrainingModel
from gpt2cli.training.packing import PackedRows, best_fit
from gpt2cli.training.setup import prepare_trainer

TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48}
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "48", "--batch-size", "4"]
EXACT = ["--device", "cpu", "--dtype", "float32", "--no-compile"]
PC = ExampleRecipe(PROMPT_COMPLETION, "completion")


def sums(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt-completion records of varied lengths."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(2, 6))]
        records.append({"prompt": "Add " + " and ".join(map(str, numbers)) + ":", "completion": f" {sum(numbers)}"})
    return records


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture
def env(tmp_path):
    return cli_env(GPT2_DATA__CACHE_DIR=str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(**TINY_MODEL)).eval()


def alone_token_losses(model: GPT2, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """The example alone at position 0, as at inference: cross-entropy of each target that counts."""
    tokens = torch.from_numpy(ids.astype(np.int64))[None]
    logits, _ = model(tokens[:, :-1])
    losses = F.cross_entropy(logits[0].float(), tokens[0, 1:], reduction="none")
    return losses[torch.from_numpy(mask[1:].astype(bool))]


# ---------------------------------------------------------------- the tokenisation rule


def test_the_prompt_is_encoded_as_gpt2_sample_encodes_it_and_agrees_with_joint_encoding():
    tokenizer = get_tokenizer()
    for record in [*sums(5), {"prompt": "Q: the capital of France?\nA:", "completion": " Paris."}]:
        ids, loss = encode_record(record, "x.jsonl:1", PC)
        prompt_ids = tokenizer.encode(record["prompt"])  # what the generator encodes (generation/generator.py)
        assert ids[: len(prompt_ids)] == prompt_ids and loss[: len(prompt_ids)] == [0] * len(prompt_ids)
        assert ids[-1] == tokenizer.eot_id and loss[len(prompt_ids) :] == [1] * (len(ids) - len(prompt_ids))
        # TRL encodes prompt + completion in one piece and masks by the prompt's length: the same tokens and mask
        # when the prompt does not end in whitespace.
        joint = tokenizer.encode(record["prompt"] + record["completion"])
        assert [*joint, tokenizer.eot_id] == ids


def test_loss_on_all_counts_the_prompt_too():
    ids, loss = encode_record(sums(1)[0], "x.jsonl:1", ExampleRecipe(PROMPT_COMPLETION, "all"))
    assert loss == [1] * len(ids)


def test_messages_take_the_templates_tokens_and_assistant_mask():
    template = ChatTemplate.default()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ids, loss = encode_record({"messages": messages}, "x.jsonl:1", ExampleRecipe(MESSAGES, "completion", template))
    rendered = template.encode(messages)
    assert ids == rendered.ids and loss == rendered.assistant_mask and sum(loss) > 0


# ---------------------------------------------------------------- packing


def test_best_fit_packs_whole_examples_and_cuts_only_the_too_long(tmp_path):
    lengths = np.array([5, 9, 3, 7, 2, 8, 4])
    rows = best_fit(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(lengths[row].sum() <= 10 for row in rows) and len(rows) == 4  # 38 tokens: 4 rows of 10
    examples = encode_examples(write_jsonl(tmp_path / "d.jsonl", sums(20)), PC)
    packed = PackedRows(examples, seq_len=8)
    assert packed.cut == int((examples.lengths > 9).sum()) > 0


def test_an_examples_loss_packed_equals_its_loss_alone(tmp_path, model):
    examples = encode_examples(write_jsonl(tmp_path / "d.jsonl", sums(12)), ExampleRecipe(PROMPT_COMPLETION, "all"))
    packed = PackedRows(examples, seq_len=47)
    assert len(packed) < len(examples)  # several examples share a row
    batch = packed.training_batch(np.arange(len(packed)), torch.device("cpu"))
    logits, _ = model(batch.inputs, documents=batch.documents)
    for row, members in enumerate(packed.rows):
        at = 0
        for example in members:
            ids, mask = examples.example(example)
            length = len(ids)
            packed_losses = F.cross_entropy(logits[row, at : at + length - 1], batch.targets[row, at : at + length - 1])
            alone = alone_token_losses(model, ids, mask)
            torch.testing.assert_close(packed_losses, alone.mean(), rtol=0, atol=1e-5)
            at += length


def test_the_masked_loss_is_the_mean_over_the_targets_that_count(tmp_path, model):
    examples = encode_examples(write_jsonl(tmp_path / "d.jsonl", sums(10)), PC)
    packed = PackedRows(examples, seq_len=47)
    hand = torch.cat([alone_token_losses(model, *examples.example(i)) for i in range(len(examples))])
    assert hand.numel() == packed.target_count(np.arange(len(packed)))  # completions and their <|endoftext|>
    batch = packed.training_batch(np.arange(len(packed)), torch.device("cpu"))
    loss = TrainingModel(model)(batch.inputs, batch.targets, batch.documents)
    torch.testing.assert_close(loss, hand.mean(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- through the real trainer


def fine_tune_data(tmp_path, count: int = 40) -> ExampleData:
    write_jsonl(tmp_path / "d.jsonl", sums(count))
    examples = load_examples(tmp_path / "d.jsonl", PC, tmp_path / "cache")
    train, val = examples.split_tail(0.2)
    return ExampleData(train=train, val=val, sources=["d.jsonl"], recipe=PC)


def make_trainer(data, out, **train):
    flags = {
        "model": TINY_MODEL,
        "train": {"device": "cpu", "dtype": "float32", "batch_size": 4, "out": str(out), "compile": False, **train},
    }
    return prepare_trainer(load_settings(None, flags), data, out, resolve_precision("float32", torch.device("cpu")))


def step_gradients(trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """One real training step; the gradients as the optimizer would receive them."""
    captured: dict[str, torch.Tensor] = {}

    def capture() -> None:
        captured.update({name: p.grad.clone() for name, p in trainer.model.named_parameters()})
        trainer.optimizer.zero_grad(set_to_none=True)

    trainer._optimizer_step = capture
    loss, _, _ = trainer._train_step()
    return loss, captured


def test_prompt_tokens_get_no_gradient_and_the_split_does_not_change_the_step(tmp_path, one_thread):
    data = fine_tune_data(tmp_path)
    whole = make_trainer(data, tmp_path / "a", max_steps=1, grad_clip=1e9)
    state = dataclasses.replace(whole.sampler.state)
    rows = whole.sampler.take(4)  # the step's rows, drawn again by the step itself
    whole.sampler.state.epoch, whole.sampler.state.cursor = state.epoch, state.cursor
    loss, gradients = step_gradients(whole)
    # By hand: the model's own loss over the completions (and <|endoftext|>) of the step's rows, nothing else.
    hand_model = GPT2(GPT2Config(**TINY_MODEL))
    hand_model.load_state_dict(whole.model.state_dict())
    batch = whole.train_windows.training_batch(rows, torch.device("cpu"))
    logits, _ = hand_model(batch.inputs, documents=batch.documents)
    hand = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    hand.backward()
    assert loss == pytest.approx(hand.item(), abs=1e-5)
    for name, parameter in hand_model.named_parameters():
        torch.testing.assert_close(gradients[name], parameter.grad, rtol=1e-4, atol=1e-6)
    # The same step as four micro-batches of one row: the same mean over the same counted targets.
    split = make_trainer(data, tmp_path / "b", max_steps=1, grad_clip=1e9, batch_size=1, total_batch_tokens=4 * 48)
    assert split.plan.grad_accum == 4
    split_loss, split_gradients = step_gradients(split)
    assert split_loss == pytest.approx(loss, abs=1e-6)
    for name, gradient in gradients.items():
        torch.testing.assert_close(split_gradients[name], gradient, rtol=1e-4, atol=1e-7)


def test_resume_with_masks_is_exact(tmp_path, one_thread):
    data = fine_tune_data(tmp_path)
    common = {"max_steps": 4, "save_interval": 2, "eval_interval": 2, "log_interval": 1, "schedule_steps": 4}
    make_trainer(data, tmp_path / "straight", **common).run()
    make_trainer(data, tmp_path / "resumed", **{**common, "max_steps": 2}).run()
    make_trainer(data, tmp_path / "resumed", **{**common, "resume": True}).run()

    def records(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, lines)]

    assert records(tmp_path / "straight") == records(tmp_path / "resumed")
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


# ---------------------------------------------------------------- the CLI


def test_a_messages_fine_tune_carries_its_template_and_eval_scores_the_assistant_turns(tmp_path, env):
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ '>' + m['content'] + "
        "'<|endoftext|>' }}{% endgeneration %}{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}"
        "{% endfor %}"
    )
    records = [
        {"messages": [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": f" {word}"}]}
        for word in ["yes", "no", "maybe", "always", "never", "sometimes"] * 5
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "run"
    args = ["train", data, *TINY, *EXACT, "--max-steps", "1", "--out", out, "--chat-template", template]
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert "messages records, loss on the assistant turns" in result.stderr.decode()
    for weights in [out / "model.safetensors", *out.glob("checkpoints/*/model.safetensors")]:
        assert read_chat_template(weights).source == template.read_text()
    # A fine-tune from it keeps the template it carries.
    again = tmp_path / "again"
    result = run_cli("train", data, *TINY, *EXACT, "--max-steps", "1", "--init-from", out, "--out", again, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert read_chat_template(again / "model.safetensors").source == template.read_text()
    # gpt2 eval: the mean over the assistant turns' tokens (the checkpoint's own template renders them).
    result = run_cli("eval", out / "model.safetensors", data, "--device", "cpu", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    examples = encode_examples(data, ExampleRecipe(MESSAGES, "completion", ChatTemplate.from_file(template)))
    trained = load_model(out / "model.safetensors", device="cpu").eval()
    with torch.no_grad():
        hand = torch.cat([alone_token_losses(trained, *examples.example(i)) for i in range(len(examples))])
    assert report["format"] == "messages" and report["tokens"] == hand.numel()
    assert report["loss"] == pytest.approx(hand.mean().item(), abs=1e-5)


def test_prompt_completion_parquet_trains(tmp_path, env):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = sums(16)
    path = tmp_path / "d.parquet"
    pq.write_table(pyarrow.Table.from_pylist(records), path)
    args = [path, *TINY, *EXACT, "--max-steps", "1", "--seq-len", "9", "--out", tmp_path / "run"]
    result = run_cli("train", *args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    examples = encode_examples(path, PC)
    cut = int((examples.split_tail(0.05)[0].lengths > 10).sum())
    assert f"prompt-completion records, loss on the completions: {len(examples) - 1} training examples" in (
        stderr := result.stderr.decode()
    )
    assert cut and f"1 held out; {cut} longer than a window of 10 tokens were cut" in stderr


def test_the_held_out_split_takes_whole_examples(tmp_path):
    examples = encode_examples(write_jsonl(tmp_path / "d.jsonl", sums(20)), PC)
    train, val = examples.split_tail(0.2)
    assert (len(train), len(val)) == (16, 4)
    assert [val.example(i)[0].tolist() for i in range(4)] == [examples.example(16 + i)[0].tolist() for i in range(4)]


def test_the_cache_key_holds_the_loss_setting(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, sums(6))
    masked = load_examples(path, PC, tmp_path / "cache")
    everything = load_examples(path, ExampleRecipe(PROMPT_COMPLETION, "all"), tmp_path / "cache")
    assert np.array_equal(masked.tokens, everything.tokens) and not np.array_equal(masked.flags, everything.flags)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.bin"))) == 4  # tokens and flags of each
    again = load_examples(path, PC, tmp_path / "cache")  # read back from the cache
    assert np.array_equal(again.flags, masked.flags) and isinstance(again, ExampleSet)


NO_MARKERS = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"


@pytest.mark.parametrize(
    ("lines", "flags", "fragments"),
    [
        (['{"prompt": "a", "completion": " b"}', "{not json"], [], ["d.jsonl:2", "invalid JSON"]),
        (['{"question": "a", "answer": "b"}'], [], ["d.jsonl:1", "no known fields", "'question'"]),
        (
            ['{"prompt": "a", "completion": " b"}', '{"messages": [{"role": "user", "content": "x"}]}'],
            [],
            ["d.jsonl:2", "messages record in a prompt-completion file"],
        ),
        (['{"text": "a", "messages": []}'], ["--format", "messages"], ["d.jsonl:1", "mixed formats"]),
        (
            ['{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}'],
            [],
            ["d.jsonl:1", "messages[1]", "unknown role 'robot'"],
        ),
        (['{"prompt": "a", "completion": ""}'], [], ["d.jsonl:1", "'completion' is empty"]),
        (
            ['{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}'],
            [],
            ["d.jsonl:1", "'prompt'", "conversational prompt/completion"],
        ),
        (
            ['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'],
            ["--chat-template", "NO_MARKERS"],
            ["{% generation %}", "--loss-on all"],
        ),
    ],
    ids=[
        "not-json",
        "no-known-fields",
        "mixed-formats",
        "mixed-in-a-record",
        "unknown-role",
        "empty-completion",
        "conversational-prompt-completion",
        "template-without-markers",
    ],
)
def test_bad_records_stop_before_training_with_one_line(tmp_path, env, lines, flags, fragments):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    (tmp_path / "plain.jinja").write_text(NO_MARKERS)
    flags = [str(tmp_path / "plain.jinja") if flag == "NO_MARKERS" else flag for flag in flags]
    out = tmp_path / "run"
    result = run_cli("train", data, *TINY, *EXACT, "--max-steps", "1", "--out", out, *flags, env=env)
    assert_one_line_error(result, 2, *fragments)
    assert not out.exists()


@pytest.mark.slow  # a torchrun job of two processes
def test_two_processes_fine_tune_as_one_with_lora(tmp_path):
    """The masks are sharded with the rows, and the step's mean counts every rank's targets: DDP on two processes
    gives the losses of one process with the same global batch. LoRA's adapters (the only trained weights) are
    averaged across the ranks, so the merged models are equal too."""
    import subprocess
    import sys

    from conftest import exact_environment
    from gpt2cli import load_model, save_model

    data = write_jsonl(tmp_path / "d.jsonl", sums(60))
    env = exact_environment(tmp_path)
    torch.manual_seed(0)
    base = save_model(GPT2(GPT2Config(**TINY_MODEL)), tmp_path / "base.safetensors")
    args = [data, "--init-from", base, "--lora-rank", "4", "--lr", "1e-2", "--batch-size", "4", *EXACT]
    args += ["--max-steps", "3", "--log-interval", "1", "--val-fraction", "0.1"]
    single = run_cli("train", *args, "--out", tmp_path / "one", env=env)
    assert single.returncode == 0, single.stderr.decode()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gpt2cli"]
    two = subprocess.run(
        [*launcher, "train", *map(str, args), "--batch-size", "2", "--out", str(tmp_path / "two")],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr.decode()[-3000:]

    def losses(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(record["loss"], record.get("val_loss")) for record in records]

    for (one_loss, one_val), (two_loss, two_val) in zip(
        losses(tmp_path / "one"), losses(tmp_path / "two"), strict=True
    ):
        assert two_loss == pytest.approx(one_loss, abs=1e-5)
        assert (two_val is None) == (one_val is None) and (
            one_val is None or two_val == pytest.approx(one_val, abs=1e-5)
        )
    merged = [load_model(tmp_path / name).state_dict() for name in ("one", "two")]
    for name, tensor in merged[0].items():
        torch.testing.assert_close(merged[1][name], tensor, rtol=0, atol=1e-5, msg=name)

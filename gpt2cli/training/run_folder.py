"""The run folder: every file a training run writes, and how a run is found again to resume it.

    model.safetensors     the latest weights (a hard link into the newest checkpoint); loads in transformers too
    config.json           transformers' config, so the folder itself is a transformers checkpoint
    config.toml           the resolved settings of the run
    metrics.jsonl         one JSON object per log line
    checkpoints/step-NNNNNN/{model,optimizer}.safetensors, state.json
    adapters.safetensors  LoRA runs with --save-adapters: the latest adapters (a hard link into the newest checkpoint)

A LoRA run's checkpoints hold `adapters.safetensors` (with their optimizer state) instead of the model, and its
state.json the base's path and SHA-256; its `model.safetensors` is then the merged model, written as a file of its own.
    checkpoints/latest    the name of the newest complete checkpoint folder
    checkpoints/best/     with --keep-best: the checkpoint of the lowest validation loss so far (hard links to the
                          step's files where the filesystem has them, so it costs no space while that step is kept)
    .lock                 the writer's lock (its PID inside): one `gpt2 train` at a time writes here

A checkpoint folder is written under a temporary name and renamed when complete, then `latest` is replaced
atomically: killing the process at any instant leaves the previous checkpoint intact and pointed to. A new `best`
is staged whole before the old one steps aside as `best.previous`, which the next writer puts back if the process
died between the two renames. A failed
write (full disk, lost permission) removes what it had written and leaves `latest` where it was.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gpt2cli import __version__
from gpt2cli.errors import CheckpointError, Gpt2Error, UsageError
from gpt2cli.formats.checkpoint import checkpoint_layout, write_checkpoint, write_hf_config
from gpt2cli.model.gpt2 import GPT2, GPT2Config
from gpt2cli.observe.trackers import Trackers, open_trackers
from gpt2cli.runtime.distributed import full_tensor
from gpt2cli.runtime.files import atomic_path, atomic_write_bytes, storage_errors

STATE_FORMAT = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
BEST_PREVIOUS = "best.previous"
LOCK = ".lock"
ADAPTERS = "adapters.safetensors"


class RunFolderInUse(Gpt2Error):
    """Another live process holds the run folder's writer lock."""


def new_run_folder(distributed: bool = False) -> Path:
    """A fresh `runs/YYYYMMDD-HHMMSS` (or, under torchrun, one name every rank agrees on)."""
    if distributed:  # every rank must name the same folder: torchrun gives the job one id
        return Path("runs") / f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = Path("runs") / stamp, 1
    while candidate.exists():
        n += 1
        candidate = Path("runs") / f"{stamp}-{n}"
    return candidate


class RunFolder:
    """One run's folder. Reading (finding a checkpoint, its state) works on any rank; writing is rank 0's, and
    starts with `open_for_writing`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = path / CHECKPOINTS
        self.metrics = path / "metrics.jsonl"
        self.model_file = path / "model.safetensors"
        self.trackers = Trackers()  # none until `start_trackers`
        self.model_metadata: dict[str, str] = {}  # extra metadata of each checkpoint's weights (a chat template)

    # ------------------------------------------------------------ the one writer

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the folder's writer lock for the block: an OS lock on `.lock` (`flock`; on Windows `msvcrt.locking`),
        which the OS releases when the process ends however it ends, so a killed run never leaves a stale lock. A
        second writer fails at once with the holder's PID. A folder created here only for the lock is removed again
        if nothing was written."""
        created = self._create_missing_folders()
        try:
            descriptor = self._acquire()
        except BaseException:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
        try:
            self._remove_stale_temporaries()  # only the writer may: they could be a live writer's save in progress
            self._recover_best()
            yield
        finally:
            unused = created is not None and {path.name for path in self.path.iterdir()} <= {LOCK}
            if unused and _LOCKING.removable_while_held:
                # Still holding the lock: nobody else can be using the folder this (refused) run created.
                shutil.rmtree(created, ignore_errors=True)
            _LOCKING.release(descriptor)
            if unused and not _LOCKING.removable_while_held:
                # Windows cannot remove an open file: after letting go. Whoever opened `.lock` meanwhile keeps the
                # file (and so the folder) in place.
                shutil.rmtree(created, ignore_errors=True)

    def _create_missing_folders(self) -> Path | None:
        """Create the run folder if missing; returns the top-most folder created (None if it existed)."""
        if self.path.exists():
            if not self.path.is_dir():
                raise UsageError(f"--out {self.path}: exists and is not a folder")
            return None
        top = self.path
        while not top.parent.exists():
            top = top.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--out {self.path}: cannot write there ({error.strerror})") from None
        return top

    def _acquire(self) -> int:
        lock = self.path / LOCK
        while True:
            try:
                descriptor = os.open(lock, _LOCK_FLAGS, 0o644)
            except OSError as error:
                raise UsageError(f"--out {self.path}: cannot write there ({error.strerror})") from None
            try:
                if not _LOCKING.try_lock(descriptor):
                    holder = _read_holder(descriptor)
                    raise RunFolderInUse(
                        f"{self.path} is in use by another gpt2 train (PID {holder}); wait for it to end or stop it"
                    )
            except BaseException:
                os.close(descriptor)
                raise
            # A refused run that had created the folder may have removed this file between our open and lock.
            if _same_file(descriptor, lock):
                os.ftruncate(descriptor, 0)
                os.lseek(descriptor, 0, os.SEEK_SET)
                os.write(descriptor, f"{os.getpid()}\n".encode())
                return descriptor
            _LOCKING.release(descriptor)

    def _remove_stale_temporaries(self) -> None:
        """Half-written files and checkpoint folders of a run that was killed (`.NAME.PID.tmp`)."""
        for stale in [*self.path.glob(".*.tmp"), *self.checkpoints.glob(".*.tmp")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    def _recover_best(self) -> None:
        """Finish a swap of `best` that a killed process left half done: the old best back if no new one is in place,
        else the old one removed."""
        previous, best = self.checkpoints / BEST_PREVIOUS, self.checkpoints / BEST
        if not previous.is_dir():
            return
        if best.is_dir():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(previous, best)

    # ------------------------------------------------------------ reading

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / LATEST
        if not pointer.is_file():
            return None
        folder = self.checkpoints / pointer.read_text().strip()
        return folder if (folder / "state.json").is_file() else None

    def checkpoint_to_resume(self, resume: bool) -> Path | None:
        """The checkpoint `--resume` continues from (None for a new run, whose folder must not hold one)."""
        existing = self.latest_checkpoint()
        if resume:
            if existing is None:
                raise UsageError(f"{self.path}: no training state to resume (expected {self.checkpoints / LATEST})")
            return existing
        if existing is not None:
            raise UsageError(f"{self.path} already holds a run; continue it with --resume or choose another --out")
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a folder")
        return None

    def best_checkpoint(self) -> Path | None:
        """`checkpoints/best` where one is kept (complete: its state.json is the last file it gets)."""
        best = self.checkpoints / BEST
        return best if (best / "state.json").is_file() else None

    @staticmethod
    def read_state(checkpoint: Path) -> dict[str, Any]:
        """A checkpoint's state.json (step, tokens, data position, RNG, plan, settings)."""
        state = json.loads((checkpoint / "state.json").read_text())
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{checkpoint}: unsupported state format {state.get('format')!r}")
        return state

    @staticmethod
    def read_adapters(checkpoint: Path) -> dict[str, torch.Tensor]:
        path = checkpoint / ADAPTERS
        if not path.is_file():
            raise CheckpointError(f"{checkpoint}: no {ADAPTERS} (was the run started without --lora-rank?)")
        return load_file(path)

    @staticmethod
    def read_optimizer(checkpoint: Path) -> dict[str, torch.Tensor]:
        return load_file(checkpoint / "optimizer.safetensors")

    # ------------------------------------------------------------ writing (rank 0)

    def open_for_writing(self, new: bool) -> None:
        """The one place a run starts writing here (a new run creates the folder; a refused run leaves nothing)."""
        if not new:
            return
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise UsageError(f"--out {self.path}: cannot write there ({error.strerror})") from None

    def write_run_files(self, settings: dict[str, Any], config: GPT2Config) -> None:
        """config.toml (the resolved settings) and, for models transformers can load, its config.json."""
        with storage_errors(f"the run's settings in {self.path}"):
            atomic_write_bytes(self.path / "config.toml", to_toml(settings).encode())
            if config.bias:
                write_hf_config(config, self.path)

    def start_trackers(self, names: list[str], settings: dict[str, Any], resumed_step: int | None) -> None:
        """TensorBoard / W&B, fed every metrics record from now on (`resumed_step`: None for a new run)."""
        self.trackers = open_trackers(names, self.path, settings, resumed_step)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One line into metrics.jsonl, the run's record, whole or not at all (a write that fails part-way is cut
        off again); the trackers get the same record, as views of it."""
        line = (json.dumps(record) + "\n").encode()
        with storage_errors(str(self.metrics)), open(self.metrics, "ab") as handle:
            size = handle.tell()
            try:
                handle.write(line)
                handle.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    handle.truncate(size)
                raise
        self.trackers.log(record)

    def close_trackers(self) -> None:
        self.trackers.close()

    def truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint being resumed (they will be written again), and a last line
        cut short by a killed process."""
        if self.metrics.is_file():
            kept = [
                line
                for line in self.metrics.read_text().splitlines()
                if (record := _json_or_none(line)) and record["step"] <= step
            ]
            with storage_errors(str(self.metrics)):
                atomic_write_bytes(self.metrics, "".join(line + "\n" for line in kept).encode())

    def save_checkpoint(
        self,
        step: int,
        model_tensors: dict[str, torch.Tensor],
        config: GPT2Config,
        moments: dict[str, torch.Tensor],
        state: dict[str, Any],
        keep: int,
        adapters: dict[str, torch.Tensor] | None = None,
        keep_adapters: bool = False,
    ) -> Path:
        """Write `checkpoints/step-NNNNNN` complete (fsynced) under a temporary name, rename it, point `latest` and
        `model.safetensors` at it, and keep the newest `keep` checkpoints.

        A LoRA run passes its `adapters`, which the checkpoint holds instead of the model; `model_tensors` (the merged
        model) are then written as the run's `model.safetensors`, and `keep_adapters` links the adapters beside it."""
        name = f"step-{step:06d}"
        folder = self.checkpoints / name
        previous = self.latest_checkpoint()
        kept = f"{previous.name} is still the latest checkpoint" if previous else "no checkpoint was saved"
        with storage_errors(f"the checkpoint of step {step} in {self.checkpoints}", kept):
            weights = model_tensors if adapters is None else None
            self._write_checkpoint_folder(folder, weights, config, moments, {"step": step, **state}, adapters)
            try:
                with atomic_path(self.checkpoints / LATEST) as temporary:
                    temporary.write_text(name + "\n")
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # complete but never current: nothing to keep
                raise
        with storage_errors(str(self.model_file), f"{name} is saved and current; {self.model_file} is older"):
            if adapters is None:
                _link_or_copy(folder / "model.safetensors", self.model_file)
            else:  # the merged model: a link into a checkpoint holding only adapters could not be it
                write_checkpoint(model_tensors, config, self.model_file, metadata=self.model_metadata)
                if keep_adapters:
                    _link_or_copy(folder / ADAPTERS, self.path / ADAPTERS)
        self.prune(keep, newest=name)
        return folder

    def _write_checkpoint_folder(
        self,
        folder: Path,
        model_tensors: dict[str, torch.Tensor] | None,
        config: GPT2Config,
        moments: dict[str, torch.Tensor],
        state: dict[str, Any],
        adapters: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Every file fsynced under `.step-NNNNNN.PID.tmp`, then renamed to `folder`; on any error, nothing."""
        staging = self.checkpoints / f".{folder.name}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
            if model_tensors is not None:
                write_checkpoint(model_tensors, config, staging / "model.safetensors", metadata=self.model_metadata)
            if adapters is not None:
                save_file(adapters, staging / ADAPTERS, metadata={"format": "pt"})
            save_file(moments, staging / "optimizer.safetensors")
            state = {"format": STATE_FORMAT, "version": __version__, **state}
            (staging / "state.json").write_text(json.dumps(state, indent=1))
            for path in staging.iterdir():
                _fsync_file(path)
            if folder.exists():  # left by a run that stopped before pointing `latest` at it
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def keep_as_best(self, checkpoint: Path, weights: Path | None = None) -> Path:
        """Make `checkpoints/best` a copy of the complete checkpoint folder `checkpoint`: its files hard-linked (copied
        where the filesystem has no hard links) into a staging folder, which then takes the place of the old best.
        `weights`: the model of the same step, for a checkpoint that holds no `model.safetensors` of its own (a LoRA
        run's holds its adapters; the merged model is the run's `model.safetensors`), so that best/ always has one."""
        best, previous = self.checkpoints / BEST, self.checkpoints / BEST_PREVIOUS
        staging = self.checkpoints / f".{BEST}.{os.getpid()}.tmp"
        kept = "the best checkpoint before it is kept" if best.exists() else "no best checkpoint was kept"
        with storage_errors(f"the best checkpoint ({checkpoint.name}) in {self.checkpoints}", kept):
            shutil.rmtree(staging, ignore_errors=True)
            try:
                staging.mkdir()
                # state.json last: a folder with it is complete (`best_checkpoint`).
                if weights is not None and not (checkpoint / "model.safetensors").exists():
                    _link_or_copy_file(weights, staging / "model.safetensors")
                for path in sorted(checkpoint.iterdir(), key=lambda path: path.name == "state.json"):
                    _link_or_copy_file(path, staging / path.name)
                if best.exists():
                    shutil.rmtree(previous, ignore_errors=True)
                    os.replace(best, previous)
                os.replace(staging, best)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        shutil.rmtree(previous, ignore_errors=True)
        return best

    def prune(self, keep: int, newest: str) -> None:
        folders = sorted(path for path in self.checkpoints.glob("step-*") if path.is_dir())
        for old in folders[: max(0, len(folders) - keep)]:
            if old.name != newest:
                shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the writer's lock, per platform

# Not inherited by child processes (Windows never inherits `os.open`'s descriptors), and on Windows no newline
# translation of the PID.
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
HOLDER_BYTES = 32  # the PID line at the start of `.lock`, as much as a refused writer reads
# Windows: the byte locked, far past the PID line. A Windows lock is mandatory: nobody else may read the bytes it
# covers, so a lock on the PID itself would hide it from the refused writer. Locking past the end of a file is
# allowed, and the file stays a few bytes long.
LOCK_BYTE = 1 << 30


class _Locking(Protocol):
    """The OS's exclusive lock on an open `.lock`, held until `release`, or until the process ends however it ends."""

    removable_while_held: bool  # whether `.lock` may be removed while a process has it open

    def try_lock(self, descriptor: int) -> bool:
        """Take the lock without waiting; False when another open file holds it (in this process or another)."""
        ...

    def release(self, descriptor: int) -> None:
        """Let go of the lock and close the file."""
        ...


class _FlockLocking:
    """POSIX: `flock` on the whole file. Advisory (the PID stays readable), held by the open file, released by the
    kernel when the last descriptor closes, so also on SIGKILL."""

    removable_while_held = True

    def try_lock(self, descriptor: int) -> bool:
        import fcntl  # POSIX only

        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self, descriptor: int) -> None:
        os.close(descriptor)


class _MsvcrtLocking:
    """Windows: `msvcrt.locking` on the one byte at LOCK_BYTE, held by the open handle (a second open in the same
    process is refused too, as with `flock`); Windows releases it when the process ends. `msvcrt` is passed in by
    tests, which run this branch on Linux with a fake of it."""

    removable_while_held = False

    def __init__(self, msvcrt: Any = None) -> None:
        self._msvcrt = msvcrt

    def _module(self) -> Any:
        if self._msvcrt is None:
            import msvcrt  # Windows only

            self._msvcrt = msvcrt
        return self._msvcrt

    def try_lock(self, descriptor: int) -> bool:
        msvcrt = self._module()
        os.lseek(descriptor, LOCK_BYTE, os.SEEK_SET)  # locking() locks from the file's position
        try:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EDEADLK):  # held by another handle (EDEADLOCK is EDEADLK)
                return False
            raise
        return True

    def release(self, descriptor: int) -> None:
        # Unlocked explicitly: Windows unlocks on close too, but documents no promise of when.
        msvcrt = self._module()
        try:
            os.lseek(descriptor, LOCK_BYTE, os.SEEK_SET)
            with contextlib.suppress(OSError):
                msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(descriptor)


def _platform_locking() -> _Locking:
    return _MsvcrtLocking() if sys.platform == "win32" else _FlockLocking()


_LOCKING: _Locking = _platform_locking()


def _read_holder(descriptor: int) -> str:
    """The PID line a writer keeps at the start of `.lock` ("unknown" while a new writer has yet to write it)."""
    os.lseek(descriptor, 0, os.SEEK_SET)
    return os.read(descriptor, HOLDER_BYTES).decode(errors="replace").strip() or "unknown"


# ---------------------------------------------------------------- tensors and RNG state <-> files


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": _encode_rng(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = _encode_rng(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(_decode_rng(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_decode_rng(state["cuda"]), device)


def gather_model_state(model: GPT2, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's whole weights in the checkpoint layout. Under FSDP every rank must call this (the shards are
    gathered one tensor at a time); ranks that do not write pass `keep=False` and get nothing back."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding, stored once
            continue
        whole = full_tensor(tensor.detach())
        if keep:
            state[name] = whole.cpu()
    return checkpoint_layout(state)


def to_toml(values: dict[str, Any]) -> str:
    """Settings as TOML: tables of scalars and lists (None values are left out)."""

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(literal(item) for item in value) + "]"
        return json.dumps(str(value))

    lines = []
    for table, fields in values.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {literal(value)}" for key, value in fields.items() if value is not None)
        lines.append("")
    return "\n".join(lines)


def _link_or_copy(source: Path, destination: Path) -> None:
    with atomic_path(destination) as temporary:
        try:
            os.link(source, temporary)
        except OSError:  # no hard links on this filesystem
            shutil.copyfile(source, temporary)


def _link_or_copy_file(source: Path, destination: Path) -> None:
    """A hard link (the same bytes, no space used), or a copy fsynced to disk."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
        _fsync_file(destination)


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.fstat(descriptor).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())

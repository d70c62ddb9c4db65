"""Atomic checkpoints: write to a temporary directory, then rename, so a crash never leaves a half-written
checkpoint where `--resume` would find it.

    out_dir/checkpoints/step_000100/
        policy/ (model.safetensors, config.json, tokenizer.json ...)   one folder per trainable module
        trainer_state.pt   optimizer, step, RNG states, algorithm state; loaded with weights_only=True
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..errors import SetupError, blocked_pickle_reason

STATE_FILE = "trainer_state.pt"
FULL_DISK_BYTES = 64 * 2**20  # a write that fails with less than this free is reported as a full disk
_PREFIX = "step_"


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse (ConfigError) a `path` that is a file, or a directory (or its nearest existing parent) that this
    process cannot write to: found before any work is done, not when the first checkpoint is due."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a directory; choose a directory path")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable")


def atomic_write_dir(final: Path, write: Any) -> None:
    """Call `write(tmp_dir)` then move tmp_dir to `final` (replacing an existing one). If anything fails (a full
    disk, an interrupt), the temporary directory is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save and safetensors report a full disk as a RuntimeError of their own: say what it is
        if isinstance(e, Exception) and shutil.disk_usage(final.parent).free < FULL_DISK_BYTES:
            raise SetupError(f"{final}: cannot write, the disk is full; earlier checkpoints are intact") from e
        raise
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(final: Path) -> None:
    """Tidy what a process killed inside `atomic_write_dir(final)` left behind: a half-written `.tmp-` dir is
    deleted; an `.old-` dir (killed between the two renames) is the previous complete version, so it is put
    back if `final` is missing. Only dirs of processes that are no longer running are touched."""
    for prefix in (".old-", ".tmp-"):
        for path in final.parent.glob(f"{prefix}{final.name}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if prefix == ".old-" and not final.exists():
                os.replace(path, final)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first (temporary dirs are ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"{_PREFIX}{step:06d}"


def prune(out_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(directory) / STATE_FILE)


def load_state(directory: Path) -> dict[str, Any]:
    """Trainer state, unpickled with weights_only=True: tensors and plain containers only, no code."""
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refusing to load trainer state: it holds objects other than tensors and plain "
                         f"containers, which could run code; not unpickled ({blocked_pickle_reason(e)})") from None
    except Exception as e:
        raise ValueError(f"{path}: refusing to load trainer state ({str(e).splitlines()[0]})") from e

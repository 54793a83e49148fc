"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

Every file fedtune writes goes to a temporary name in the same folder first and is renamed
over the target (``os.replace``, atomic on POSIX), so a run killed at any instant leaves no
0-byte PNG, truncated JSON or half-written safetensors behind. Folders written as a unit
(a PEFT adapter: config + weights) are built under a temporary name and swapped in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)  # read it once: temporary files start private, results get the usual modes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata) if metadata else None)


def savefig(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig`` atomically (the format comes from ``path``'s suffix, not the temp name)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", **kwargs)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it takes ``path``'s place.

    The swap is two renames (old folder aside, new one in), so at every instant a complete
    folder exists under ``path`` or under the aside name; the old one is deleted last."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        aside = None
        if target.exists():
            aside = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(target, aside)
        os.replace(tmp, target)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

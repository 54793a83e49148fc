"""What fedtune's commands share: reading their arguments, printing a run's summary, and
keeping third-party libraries quiet. Here rather than in ``cli.py`` so that every command
module (``fedtune run``, ``fedtune flower ...``, the studies) imports it without importing the CLI."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedtune.errors import UsageError


def split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise UsageError(f"unexpected argument {item!r}: give one config file and key=value overrides")
    return config, overrides


def format_summary(summary: dict[str, Any], out: Path) -> str:
    """The table printed at the end of a run (fields a runtime did not record are left out)."""
    rows = [
        ("method", summary["method"] + (f" ({summary['runtime']})" if summary.get("runtime") else "")),
        ("model / dataset", f"{summary['model']} / {summary['dataset']}"),
        ("rounds x clients", f"{summary['rounds']} x {summary['clients']}"),
    ]
    for key, value in summary.get("final", {}).items():
        rows.append((f"final {key}", f"{value:.4f}" if isinstance(value, float) else str(value)))
    best = summary.get("best", {})
    if best.get("round") is not None:
        rows.append((f"best {summary['primary_metric']}", f"{best[summary['primary_metric']]:.4f} (round {best['round']})"))
    rows.append(("trainable / shared params", f"{summary['trainable_params']:,} / {summary['shared_params']:,}"))
    rows.append(("uplink total", human_bytes(summary["total_bytes_up"])))
    rows.append(("downlink total", human_bytes(summary["total_bytes_down"])))
    for key in ("failed_replies", "rejected_replies"):
        if summary.get(key):
            rows.append((key.replace("_", " "), str(summary[key])))
    if "wall_seconds" in summary:
        rows.append(("wall time", f"{summary['wall_seconds']:.1f} s"))
    rows.append(("run directory", str(out)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def quiet_libraries() -> None:
    """Only fedtune's own words on stderr, where one-line errors must stay one line.

    fedtune draws its own progress bars and reports bad input itself; the libraries' per-file
    bars, their logged parse errors (which fedtune turns into its one-line error), bitsandbytes'
    note about an optional CPU kernel package, and deprecations inside the libraries' own calls
    are noise to a fedtune user."""
    import logging
    import warnings

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|torch)\.")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")


def worker_setup(threads: int, parent: int) -> None:
    """A worker process's set-up (``--jobs``): its share of the cores, the parent's quiet
    libraries, and an exit when the parent (pid ``parent``) is gone. It lives here, not
    beside the pool, so that a spawned worker unpickles it without importing the model libraries
    first (bitsandbytes speaks on import)."""
    import torch

    exit_when_orphaned(parent)
    torch.set_num_threads(threads)
    quiet_libraries()


def exit_when_orphaned(parent: int, interval: float = 2.0, on_orphan: Callable[[], object] | None = None) -> threading.Thread:
    """Watch (in a daemon thread) for the parent's death and then end this process.

    A process pool's workers outlive a parent killed by a signal (``kill``, a scheduler's
    SIGTERM): they finish the runs they hold and the one queued next, with the code they
    imported, and write their records. Polling the parent pid is POSIX-wide and does not depend
    on which of the parent's threads started the worker (Linux's PR_SET_PDEATHSIG does)."""
    def leave() -> None:
        os._exit(1)  # the run in progress writes no record: its summary would come last

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        (on_orphan or leave)()

    thread = threading.Thread(target=watch, name="fedtune-parent-watch", daemon=True)
    thread.start()
    return thread

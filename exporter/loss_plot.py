"""Loss curves of a training log as LLaMA-Factory draws them: `training_loss.png` (and eval loss, dpo/kto rewards)
beside a run's outputs, and the web board's live figure, with LLaMA-Factory's smoothing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def smooth(values: list[float]) -> list[float]:
    """TensorBoard-style EMA with LLaMA-Factory's length-dependent weight."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


PLOT_COLORS = {"loss": "#1f77b4", "eval_loss": "#ff7f0e"}  # others (dpo/kto rewards) take the first
PLOTTED = ("loss", "eval_loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def loss_figure(log: list[dict[str, Any]], keys: tuple[str, ...], title: str) -> Any:
    """A matplotlib figure (Agg) of each key's logged values (faint) and LLaMA-Factory's smoothed curve; None when
    the log has none of them. Shared by training_loss.png and the web board's live plot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    series = {k: [(r["current_steps"], r[k]) for r in log if r.get(k) is not None] for k in keys}
    series = {k: pts for k, pts in series.items() if pts}
    if not series:
        return None
    fig = Figure()
    ax = fig.add_subplot()
    for key, pts in series.items():
        steps, vals = zip(*pts, strict=True)
        name = "" if len(keys) == 1 else f"{key} "
        color = PLOT_COLORS.get(key, PLOT_COLORS["loss"])
        ax.plot(steps, vals, color=color, alpha=0.4, label=f"{name}original")
        ax.plot(steps, smooth(list(vals)), color=color, label=f"{name}smoothed")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(keys[0] if len(keys) == 1 else "loss")
    ax.legend()
    return fig


def plot(log: list[dict[str, Any]], out_dir: Path, title: str | None = None) -> list[Path]:
    """training_loss.png (and training_eval_loss.png; for dpo/kto training_rewards_accuracies.png ... as
    LLaMA-Factory names them) from the trainer log into `out_dir`; `title` names the run (default: out_dir)."""
    written = []
    for key in PLOTTED:
        fig = loss_figure(log, (key,), f"training {key} of {title or out_dir}")
        if fig is None:
            continue
        path = out_dir / f"training_{key.replace('/', '_')}.png"
        fig.savefig(path, format="png", dpi=100)
        written.append(path)
    return written

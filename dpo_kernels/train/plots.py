"""PNG plots of a run from its metrics log: loss, reward accuracy and reward margin against the
optimiser step, training and held-out curves on the same axes."""

from __future__ import annotations

from pathlib import Path

from .metrics_log import read_metrics

PANELS = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))


def plot_metrics(metrics_path: Path, out_path: Path, *, title: str = "DPO training") -> Path:
    """Write one PNG with three panels; returns its path. Needs matplotlib (the `train` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (key, label) in zip(axes, PANELS):
        for split, style in (("train", dict(lw=1.0, alpha=0.8)), ("eval", dict(marker="o", lw=1.6))):
            points = [(e["step"], e[key]) for e in events if e["split"] == split and isinstance(e.get(key), float)]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label="held-out" if split == "eval" else "train", **style)
        if key == "rewards/accuracies":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("optimiser step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path

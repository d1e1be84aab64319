"""Reward metrics of a preference run, for run.json and the plot (rewards.png beside loss.png)."""

from __future__ import annotations

from pathlib import Path

# -- metrics for run.json and the plot -------------------------------------------------------------
REWARD_KEYS = ("chosen", "rejected", "margins", "accuracies")


def _reward_rows(history: list[dict], prefix: str) -> list[dict]:
    rows = []
    for h in history:
        values = {k: h[f"{prefix}rewards/{k}"] for k in REWARD_KEYS if f"{prefix}rewards/{k}" in h}
        if values:
            rows.append({"step": h.get("step"), **values})
    return rows


def reward_metrics(history: list[dict]) -> dict:
    """rewards/{chosen,rejected,margins,accuracies} (training) and their eval_ twins from
    trainer.state.log_history, for run.json. TRL scores ties as wrong, so accuracy starts at 0, not
    0.5; KTO logs no accuracy, and chosen/rejected only for batches that hold both labels."""
    train, evals = _reward_rows(history, ""), _reward_rows(history, "eval_")
    out: dict = {"rewards": train, "eval_rewards": evals}
    for prefix, rows in (("", train), ("eval_", evals)):
        for key, name in (("margins", "margin"), ("accuracies", "accuracy")):
            out[f"final_{prefix}reward_{name}"] = next((r[key] for r in reversed(rows) if key in r), None)
    return out


def plot_rewards(history: list[dict], path: str | Path) -> bool:
    """rewards.png beside loss.png: chosen, rejected and margin per step (train lines, eval points) and
    the reward accuracy. False when the history holds no reward (nothing written)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nekotune.io import atomic_write_bytes

    metrics = reward_metrics(history)
    if not metrics["rewards"] and not metrics["eval_rewards"]:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for rows, style, tag in ((metrics["rewards"], "-", ""), (metrics["eval_rewards"], "o--", "eval ")):
        for key, ax in (("chosen", left), ("rejected", left), ("margins", left), ("accuracies", right)):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{tag}{key}")
    for ax, label in ((left, "reward"), (right, "reward accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def plot_run(history: list[dict], run: str | Path) -> None:
    """loss.png with nekotune's SFT plot (TRL logs loss and eval_loss as the Trainer does) and rewards.png."""
    from nekotune.training.report import plot_losses

    plot_losses(history, Path(run) / "loss.png")
    plot_rewards(history, Path(run) / "rewards.png")



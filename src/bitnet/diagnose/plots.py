"""Pictures: loss curves of a run and its twin, ternary fractions per layer."""
import math

from ..rundir import atomic_path, read_metrics_file


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of a metrics.jsonl (a partial last line, a crash's trace, is skipped)."""
    train, evals = [], []
    for entry in read_metrics_file(path):
        {"train": train, "eval": evals}.get(entry.get("kind"), []).append(entry)
    return train, evals


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, out_png: str):
    """A whole PNG or none (a full disk is one line, see rundir.atomic_path)."""
    try:
        with atomic_path(out_png, "the plot") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def plot_loss_curves(runs: dict[str, str], out_png: str) -> str:
    """Train (thin) and validation (thick, dots) loss per run, e.g. {"ternary": ..., "fp twin": ...}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, path) in enumerate(runs.items()):
        train, evals = read_metrics(path)
        color = f"C{i}"
        if train:
            ax.plot([t["step"] for t in train], [t["train_loss"] for t in train], color=color, alpha=0.35,
                    lw=1, label=f"{label} train")
        if evals:
            ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], color=color, lw=2, marker="o",
                    ms=3, label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title("loss: ternary vs full-precision twin")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, out_png)
    return out_png


def plot_ternary_fractions(metrics_path: str, out_png: str) -> str:
    """One panel per BitLinear: shares of -1 / 0 / +1 over training (needs QuantHealthTracker logs)."""
    _, evals = read_metrics(metrics_path)
    evals = [e for e in evals if e.get("quant_health")]
    if not evals:
        raise ValueError(f"{metrics_path} has no quant_health entries; train with on_eval=QuantHealthTracker(...)")
    layer_names = list(evals[-1]["quant_health"])
    ncols = min(7, len(layer_names))  # one row per block: q k v o gate up down
    nrows = math.ceil(len(layer_names) / ncols)
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 1.9 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    steps = [e["step"] for e in evals]
    for ax, name in zip(axes.flat, layer_names):
        for key, label, color in (("frac_neg", "-1", "C3"), ("frac_zero", "0", "C7"), ("frac_pos", "+1", "C0")):
            ax.plot(steps, [e["quant_health"].get(name, {}).get(key, float("nan")) for e in evals],
                    color=color, label=label)
        ax.set_title(name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", ""), fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(layer_names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("ternary weight fractions per layer", fontsize=9)
    fig.tight_layout()
    _save(plt, fig, out_png)
    return out_png

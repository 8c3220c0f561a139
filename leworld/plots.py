"""Pictures of what the verbs measure, as PNG files a person reads at a glance: training curves,
the probe's predictions against the truth, imagined rollouts against "nothing changes", planning
against its floor and ceiling, and surprise at impossible events. Each function takes what its
verb already computed and writes one file; none computes anything itself.

matplotlib draws offscreen (its Agg back end), chosen here before pyplot is imported so that no
display is needed.
"""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100  # a figure of w x h inches is a PNG of 100·w x 100·h pixels
OURS, FLOOR, CEILING = "#1f77b4", "#999999", "#2ca02c"


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def plot_training(metrics_file: Path, path: Path) -> Path:
    """The loss and its two terms per step (training rows), with the held-out ones where validated."""
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, term, title in zip(axes, ["loss", "pred", "sigreg"], ["loss", "next-latent prediction", "SIGReg"]):
        steps = [r["step"] for r in rows if term in r]
        ax.plot(steps, [r[term] for r in rows if term in r], color=OURS, lw=1, label="training")
        held_out = [(r["step"], r[f"val_{term}"]) for r in rows if f"val_{term}" in r]
        if held_out:
            ax.plot(*zip(*held_out), "o-", color="#d62728", ms=3, label="held out")
        ax.set(title=title, xlabel="step", yscale="log")
        ax.legend(fontsize=8)
    return save(figure, path)


def plot_probe(truth: np.ndarray, predicted: np.ndarray, names: list[str], r2: dict, path: Path) -> Path:
    """The linear probe's prediction against the true value of each state variable, held-out frames."""
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.axis("off")
            continue
        ax.scatter(truth[:, i], predicted[:, i], s=3, alpha=0.4, color=OURS)
        low, high = truth[:, i].min(), truth[:, i].max()
        ax.plot([low, high], [low, high], color="k", lw=0.8)
        ax.set_title(f"{names[i]}  R² {r2[names[i]]:.2f}", fontsize=9)
        ax.tick_params(labelsize=7)
    figure.supxlabel("true")
    figure.supylabel("read from the latent")
    return save(figure, path)


def plot_rollout(errors: dict, path: Path) -> Path:
    """Latent error of imagined rollouts at each horizon, against predicting that nothing changes."""
    horizons = np.arange(1, len(errors["model"]) + 1)
    figure, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(horizons, errors["model"], "o-", color=OURS, label="world model")
    ax.plot(horizons, errors["no_change"], "s--", color=FLOOR, label="nothing changes")
    ax.set(xlabel="chunks ahead", ylabel="latent MSE (held out)", yscale="log", xticks=horizons,
           title="imagined rollouts")
    ax.legend()
    return save(figure, path)


def plot_eval(summary: dict, path: Path, oracle: dict | None = None) -> Path:
    """Planning success (± its standard error) and median final distance: the model, random
    actions and, when given, the oracle (the simulator as the model)."""
    rows = [("this model", summary["planner"], OURS)]
    rows += [("random actions", summary["random"], FLOOR)] if "random" in summary else []
    rows += [("oracle", oracle, CEILING)] if oracle else []
    names, stats, colours = zip(*rows)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [100 * s["success_rate"] for s in stats], yerr=[100 * s["standard_error"] for s in stats],
             color=colours, capsize=4)
    left.set(ylabel="success %", ylim=(0, 100), title="planning success")
    right.bar(names, [s["median_final_distance"] for s in stats], color=colours)
    right.set(ylabel="median final distance", title="where the episodes ended")
    return save(figure, path)


def plot_surprise(results: dict, event: int, path: Path, title: str = "") -> Path:
    """Surprise over a clip's frames, the unperturbed copies against the perturbed ones (mean ± its
    standard error), one panel per perturbation, the event marked."""
    figure, axes = plt.subplots(1, len(results), figsize=(3.5 * len(results), 3.2), squeeze=False, sharey=True)
    for ax, (name, s) in zip(axes[0], results.items()):
        for copy, colour, label in [("control", FLOOR, "as it was"), ("perturbed", "#d62728", "perturbed")]:
            mean, se = np.asarray(s[copy]["mean"]), np.asarray(s[copy]["se"])
            ax.plot(s["frames"], mean, "o-", ms=3, color=colour, label=label)
            ax.fill_between(s["frames"], mean - se, mean + se, color=colour, alpha=0.25)
        ax.axvline(event, color="k", ls=":", lw=1)
        ax.set(title=f"{name}\nat the event {s['at']['ratio']:.1f}x, p {s['at']['p']:.2g}", xlabel="frame",
               yscale="log")
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("surprise (latent prediction error)")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return save(figure, path)

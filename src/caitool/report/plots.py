"""The report's figures: matplotlib (Agg) drawings returned as inline PNG ``<img>`` tags."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

from caitool.eval_stats import ModelSummary
from caitool.records import PreferenceRecord
from caitool.report.html import esc


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "figure.dpi": 110,
        }
    )
    return plt


def integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def image(fig: Any, alt: str) -> str:
    """The figure as an inline PNG (a data URI), then closed."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def curves_figure(series: dict[str, list[tuple[float, float]]], title: str) -> str:
    """One small panel per quantity, side by side, against the training step."""
    plt = pyplot()
    names = [name for name, points in series.items() if points]
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 2.6), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        xs, ys = zip(*series[name], strict=True)
        axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, color="#3465a4")
        axis.set_title(title if len(names) == 1 else name.replace("_", " "), fontsize=11)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(integer_ticks())
    if len(names) > 1:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return image(fig, title)


def log_series(
    entries: Sequence[dict[str, Any]], keys: Sequence[str]
) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {key: [] for key in keys}
    for entry in entries:
        step = entry.get("step")
        for key in keys:
            value = entry.get(key)
            if (
                isinstance(step, int | float)
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                series[key].append((float(step), float(value)))
    return series


def bar_figure(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str) -> str:
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(6.5, 0.28 * len(labels) + 0.9))
    axis.barh(list(labels)[::-1], list(values)[::-1], color="#73a0c8")
    axis.set_xlabel(xlabel)
    axis.xaxis.set_major_locator(integer_ticks())
    axis.set_title(title, fontsize=11)
    axis.grid(axis="y", alpha=0)
    fig.tight_layout()
    return image(fig, title)


def calibration_figure(rows: Sequence[dict[str, Any]]) -> str:
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(3.6, 3.4))
    axis.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    axis.scatter(
        [r["mean_predicted"] for r in rows],
        [r["mean_label"] for r in rows],
        s=[30 + 12 * r["count"] for r in rows],
        color="#3465a4",
        alpha=0.8,
        label="bins (size: pairs)",
    )
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("reward model's P(chosen)")
    axis.set_ylabel("labeller's p_chosen")
    axis.set_title("Calibration (held-out pairs)", fontsize=11)
    axis.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return image(fig, "calibration")


def eval_figure(summaries: Sequence[ModelSummary]) -> str:
    """Refusal rate (and mean reward, when a reward model scored) per prompt set, one bar per model."""
    plt = pyplot()
    sets = list(dict.fromkeys(s.prompt_set for s in summaries))
    models = list(dict.fromkeys(s.model_name for s in summaries))
    by_key = {(s.prompt_set, s.model_name): s for s in summaries}
    has_reward = any(s.mean_reward is not None for s in summaries)
    fig, axes = plt.subplots(
        1, 2 if has_reward else 1, figsize=(8.5 if has_reward else 4.5, 2.8), squeeze=False
    )
    width = 0.8 / max(len(models), 1)
    colours = ["#a0a0a0", "#73a0c8", "#3465a4", "#204a87", "#729fcf"]
    for panel, (key, label) in enumerate(
        [("refusal_rate", "refusal rate"), ("mean_reward", "mean reward")][: 2 if has_reward else 1]
    ):
        axis = axes[0][panel]
        for index, model in enumerate(models):
            values = [getattr(by_key.get((s, model)), key, None) or 0.0 for s in sets]
            axis.bar(
                [i + index * width for i in range(len(sets))],
                values,
                width,
                label=model,
                color=colours[index % len(colours)],
            )
        axis.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(sets))], sets)
        axis.set_title(label, fontsize=11)
        if key == "refusal_rate":
            axis.set_ylim(0, 1)
        axis.grid(axis="x", alpha=0)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return image(fig, "eval by model")


def labels_figure(records: Sequence[PreferenceRecord]) -> str:
    """The label distribution, and each pair's two option orders against each other."""
    both = [r for r in records if r.p_swapped is not None]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.hist(
        [r.p_chosen for r in records],
        bins=[0.5 + 0.05 * i for i in range(11)],
        color="#73a0c8",
        edgecolor="white",
    )
    left.set_xlabel("p_chosen (confidence of the label)")
    left.set_ylabel("pairs")
    left.set_title("Label distribution", fontsize=11)
    if both:
        right.scatter(
            [r.p_first for r in both], [r.p_swapped for r in both], s=18, color="#3465a4", alpha=0.7
        )
        right.axhline(0.5, color="grey", lw=0.8)
        right.axvline(0.5, color="grey", lw=0.8)
        right.set_xlim(0, 1)
        right.set_ylim(0, 1)
        right.set_xlabel("P(first better), first shown as (A)")
        right.set_ylabel("… first shown as (B)")
        right.set_title("The two option orders", fontsize=11)
    else:
        right.set_axis_off()
    fig.tight_layout()
    return image(fig, "preference labels")

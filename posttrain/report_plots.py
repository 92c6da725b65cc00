"""The report's pictures: metrics of every stage on one step axis (matplotlib, Agg backend).

A panel gathers the metrics whose names it matches; each metric is drawn per stage (a loss
of SFT and a loss of GRPO are not one curve), in one colour across stages, shifted by the
stage's offset (`posttrain.report.stage_offsets`). Dashed lines separate the stages, whose
names head the top panel; the legend names the metrics. Sparse series (evaluations) get markers.

Test: `pytest tests/test_report.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]


@dataclass(frozen=True)
class Panel:
    title: str
    file: str
    """PNG name without suffix."""
    matches: Callable[[str], bool]
    """Which metric names the panel draws."""


PANELS = (
    Panel("train reward", "reward", lambda k: k == "train/reward/total"),
    Panel(
        "eval accuracy",
        "eval",
        lambda k: k in ("eval/accuracy", "eval/pair_accuracy"),
    ),
    Panel("KL", "kl", lambda k: "/kl" in k),
    Panel(
        "completion length",
        "length",
        lambda k: k.startswith("rollout/completion_length") or k == "eval/completion_length",
    ),
    Panel("loss", "loss", lambda k: k == "train/loss"),
)

MARKERS_BELOW = 30
"""A series with fewer points than this is drawn with markers."""


def panel_series(
    panel: Panel, records: list[Record], offsets: dict[str, int]
) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """key -> stage -> (shifted steps, values) of the metrics the panel matches."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for r in records:
        for key, value in r.items():
            if key in ("stage", "step") or not panel.matches(key):
                continue
            xs, ys = out.setdefault(key, {}).setdefault(r["stage"], ([], []))
            xs.append(r["step"] + offsets[r["stage"]])
            ys.append(value)
    return dict(sorted(out.items()))


def plot_panel(panel: Panel, records: list[Record], offsets: dict[str, int], path: Path) -> bool:
    """Write one panel's PNG; False (nothing written) when the run logged none of its metrics."""
    series = panel_series(panel, records, offsets)
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    _draw(ax, panel, series, records, offsets, names=True)
    ax.set_xlabel("step (stages end to end)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_overview(records: list[Record], offsets: dict[str, int], path: Path) -> None:
    """Every panel that has data, stacked on a shared step axis."""
    drawn = [(p, s) for p in PANELS if (s := panel_series(p, records, offsets))]
    plt = _pyplot()
    fig, axes = plt.subplots(
        max(len(drawn), 1), 1, figsize=(8, 2.3 * max(len(drawn), 1) + 0.6), sharex=True
    )
    axes = list(axes) if len(drawn) > 1 else [axes]
    for index, (ax, (panel, series)) in enumerate(zip(axes, drawn, strict=False)):
        _draw(ax, panel, series, records, offsets, names=index == 0)
    if not drawn:
        axes[0].text(0.5, 0.5, "no plottable metrics", ha="center", transform=axes[0].transAxes)
    axes[-1].set_xlabel("step (stages end to end)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw(ax, panel: Panel, series, records: list[Record], offsets: dict[str, int], names: bool):
    import matplotlib

    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (key, by_stage) in enumerate(series.items()):
        colour = colours[n % len(colours)]  # one colour per metric, across stages
        for i, (xs, ys) in enumerate(by_stage.values()):
            marker = "o" if len(xs) < MARKERS_BELOW else None
            ax.plot(
                xs, ys, color=colour, marker=marker, ms=3, lw=1.2, label=key if i == 0 else None
            )
    _stage_marks(ax, records, offsets, names)
    ax.set_ylabel(panel.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _stage_marks(ax, records: list[Record], offsets: dict[str, int], names: bool) -> None:
    """The whole run's step range, dashed separators between stages, names above if `names`."""
    ends: dict[str, int] = {}
    for r in records:
        ends[r["stage"]] = max(ends.get(r["stage"], 0), r["step"] + offsets[r["stage"]])
    ax.set_xlim(0, max(ends.values()) + 1)  # every panel spans every stage
    for stage, start in offsets.items():
        if start > 0:
            ax.axvline(start + 0.5, color="grey", ls="--", lw=0.8)
        if names:
            ax.text(
                (start + ends[stage]) / 2,
                1.02,
                stage,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=9,
                color="dimgrey",
            )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

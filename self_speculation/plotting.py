"""Plots of sweep results (matplotlib, no display)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402


def sweep_plot(frame: pd.DataFrame, column: str, title: str, stem: Path) -> list[Path]:
    """Contour of `column` over exit_layer × num_speculations (a line plot when one axis has a single value);
    written as PNG and PDF."""
    grid = frame.pivot_table(index="num_speculations", columns="exit_layer", values=column)
    figure, axes = plt.subplots(figsize=(7, 5))
    if grid.shape[0] > 1 and grid.shape[1] > 1:
        contour = axes.contourf(grid.columns, grid.index, grid.values, levels=15, cmap="viridis")
        figure.colorbar(contour, ax=axes, label=column)
        best = frame.loc[frame[column].idxmax()]
        axes.plot(best["exit_layer"], best["num_speculations"], "r*", markersize=14, label="best")
        axes.legend()
        axes.set(xlabel="exit_layer", ylabel="num_speculations")
    else:
        x = "exit_layer" if grid.shape[1] > 1 else "num_speculations"
        ordered = frame.sort_values(x)
        axes.plot(ordered[x], ordered[column], marker="o")
        axes.set(xlabel=x, ylabel=column)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=grid.shape[0] > 1 and grid.shape[1] > 1))
    axes.set_title(title)
    return _save(figure, stem)


def policy_plot(frame: pd.DataFrame, column: str, stem: Path) -> list[Path]:
    """`column` by exit layer for each draft policy, at its best draft length per exit layer (the adaptive policy
    has one point per exit layer); written as PNG and PDF."""
    figure, axes = plt.subplots(figsize=(7, 5))
    for policy, rows in frame.groupby("draft_policy", sort=False):
        best = rows.groupby("exit_layer")[column].max()
        axes.plot(best.index, best.values, marker="o", label=policy)
    axes.set(xlabel="exit_layer", ylabel=column, title=f"{column} by exit layer, the best draft length of each policy")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return _save(figure, stem)


def _save(figure, stem: Path) -> list[Path]:
    figure.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return paths

"""The analysis figures (matplotlib, Agg backend: files only, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cka_heatmap(matrix, path: Path, title: str, ylabel: str = "student layer", xlabel: str = "teacher layer") -> Path:
    """Rows: student layers 0..L (bottom to top), columns: teacher layers 0..T."""
    plt = _pyplot()
    rows, cols = len(matrix), len(matrix[0])
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * cols, 1.0 + 0.45 * rows))
    image = ax.imshow(matrix, origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if rows * cols <= 200:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if matrix[i][j] < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="linear CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def probe_plot(models: Dict[str, Dict[str, List[Optional[float]]]], path: Path) -> Path:
    """Content error and speaker accuracy per layer, one line per model, against relative depth
    (layer / number of layers) so that models of different depth sit side by side."""
    plt = _pyplot()
    panels = [("content_error", "content probe: CER (lower is better)"),
              ("speaker_accuracy", "speaker probe: accuracy (higher is better)")]
    panels = [p for p in panels if any(any(v is not None for v in m.get(p[0]) or []) for m in models.values())]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name, result in models.items():
            values = result.get(key) or []
            if not values:
                continue
            depth = max(len(values) - 1, 1)
            ax.plot([i / depth for i in range(len(values))], values, marker="o", label=f"{name} ({len(values) - 1} L)")
        ax.set_xlabel("relative depth (layer / layers; 0 = CNN feature)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cosine_plot(cosines: Dict[str, Dict[str, float]], path: Path) -> Path:
    """Cosine similarity of every distilled output to its mapped teacher layer, per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cosines), figsize=(3.2 * len(cosines) + 0.5, 3.0), squeeze=False)
    for ax, (name, values) in zip(axes[0], cosines.items()):
        ax.bar(range(len(values)), list(values.values()), color="tab:blue")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(list(values), rotation=60, fontsize=7)
        ax.set_ylim(min(0.0, *values.values()), 1.0)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("cosine to teacher target")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["cka_heatmap", "cosine_plot", "probe_plot"]

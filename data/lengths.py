"""The length histogram of prepared examples: counted while streaming (fixed bins, so memory
does not grow with the input), kept as data in stats.json and drawn as a PNG next to the cache.

Lengths are the rendered lengths before truncation, so the bar past seq_len shows what
truncation cut (or, for documents, what was split).
"""

from __future__ import annotations

from pathlib import Path

BINS = 32


class LengthHistogram:
    """Counts of example lengths in BINS equal bins up to seq_len, and one bin past it."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.counts = [0] * (BINS + 1)

    def add(self, lengths) -> None:
        for n in lengths:
            self.counts[min(max(n - 1, 0) * BINS // self.seq_len, BINS)] += 1

    def to_dict(self) -> dict:
        edges = [round(self.seq_len * i / BINS) for i in range(BINS + 1)]
        return {"bin_edges": edges, "counts": self.counts[:BINS], "over_seq_len": self.counts[BINS]}


def plot_lengths(histogram: dict, path: Path, *, title: str) -> Path:
    """A bar chart of the histogram (matplotlib's Agg canvas: no display needed).

    Drawn on a bare Figure with fixed margins: pyplot's figure bookkeeping and tight_layout (which
    draws the figure once more to measure its text) took most of the plot's time, a fixed cost
    of every preparation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges, counts = histogram["bin_edges"], histogram["counts"]
    width = edges[1] - edges[0]
    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.14, top=0.91)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=width, align="edge", color="#4878a8")
    if histogram["over_seq_len"]:
        ax.bar([edges[-1]], [histogram["over_seq_len"]], width=width, align="edge", color="#c44e52",
               label=f"over seq_len ({histogram['over_seq_len']})")
        ax.legend()
    ax.axvline(edges[-1], color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("tokens per example (rendered, before truncation)")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path

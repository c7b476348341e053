"""The report's figures lay out their text without overlaps (measured from matplotlib's own
text extents after drawing), and held-out markers stay visible where they equal a search point."""

from __future__ import annotations

import numpy as np
from matplotlib.image import imread

from fuse_evo.results import plots


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_heatmap_titles_and_row_labels_do_not_collide():
    labels = ["embed"] + [f"L{i}" for i in range(8)] + ["norm", "head"]
    rows = [(f"trial {100 + i} (a long front member name)", {f"w_{m}": list(np.linspace(0, 1, len(labels)) * (i + 1) / 9)
                                                            for m in ("increment", "reverse", "shift")})
            for i in range(9)]
    fig = plots.heatmap_figure(labels, rows, "front members' coefficients (sorted by increment)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(axes) == 3
    suptitle = fig._suptitle.get_window_extent(renderer)
    for ax in axes:
        assert not _overlap(suptitle, ax.title.get_window_extent(renderer)), "the main title covers a panel's title"
    first_labels = [t.get_window_extent(renderer) for t in axes[0].get_yticklabels() if t.get_text()]
    assert len(first_labels) == len(rows)
    assert min(b.x0 for b in first_labels) >= 0  # inside the figure
    for ax in axes[1:]:
        assert not any(t.get_text() for t in ax.get_yticklabels())  # row labels only once, on the left
        panel = ax.get_window_extent(renderer)
        left = axes[axes.index(ax) - 1].get_window_extent(renderer)
        assert panel.x0 >= left.x1
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_heldout_markers_are_drawn_over_equal_search_points(tmp_path):
    front = [[0.2, 0.9], [0.5, 0.5], [0.9, 0.1]]
    path = tmp_path / "front.png"
    plots.front_scatter(["a", "b"], front, front, [0.0, 0.0], path, heldout=front, heldout_label="held-out")
    image = imread(path)[..., :3]
    c0 = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's C0, the held-out markers' edge colour
    assert (np.abs(image - c0).sum(axis=2) < 0.05).sum() > 50  # visible, not hidden under the front's markers

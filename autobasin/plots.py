"""How the command line shows a spec: the coverage number and the spec graph plot.

:func:`autobasin.spec.format_coverage` is the one way a coverage fraction is printed;
:func:`plot_spec` draws a spec's groups over the model's tensors at a size
that keeps every label readable (8 pt at the saved 100 dpi, none overlapping),
whatever the number of tensors.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .spec import format_coverage

LABEL_PT = 8         # every label, at the saved dpi
DPI = 100
ROW_IN = 0.17        # one tensor or group label per row: 8 pt is 0.11 in
EDGE_IN = 2.2        # the band the edges cross, between the tensor and the group column
HEADER_IN = 1.0      # title and legend
FOOT_IN = 0.25
MARGIN_IN = 0.2
PANEL_GAP_IN = 0.35
MAX_PANELS = 8       # side-by-side columns of tensors
MAX_ROWS = 120       # tensors per column; beyond MAX_PANELS * MAX_ROWS only the first are drawn
MAX_LABEL_CHARS = 56
TALLEST = 1.25       # a figure is at most this many times as high as wide, when columns allow


def _short(text: str) -> str:
    if len(text) <= MAX_LABEL_CHARS:
        return text
    half = (MAX_LABEL_CHARS - 1) // 2
    return text[:half] + "\u2026" + text[-half:]


def _width_in(texts, size: float) -> float:
    """The widest of ``texts`` in inches, set at ``size`` points."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties
    renderer = RendererAgg(1, 1, 72)  # at 72 dpi a pixel is a point
    prop = FontProperties(size=size)
    widest = max((renderer.get_text_width_height_descent(t, prop, ismath=False)[0]
                  for t in texts), default=0.0)
    return widest / 72.0


def _panels(names: list[str], touching, n_panels: int) -> list[tuple[list[str], list]]:
    """``names`` cut into ``n_panels`` runs; each with the groups touching it, in the order of
    their members' mean position (so edges cross little)."""
    per = math.ceil(len(names) / n_panels) if names else 0
    out = []
    for k in range(n_panels):
        chunk = names[k * per:(k + 1) * per]
        if not chunk and k:
            break
        row = {n: i for i, n in enumerate(chunk)}
        groups = [g for g in touching if any(m.param in row for m in g.members)]
        groups.sort(key=lambda g: sum(row[m.param] for m in g.members if m.param in row)
                    / sum(1 for m in g.members if m.param in row))
        out.append((chunk, groups))
    return out


def plot_spec(spec, path: str | os.PathLike | None = None, title: str | None = None):
    """Draw a spec's groups over the model's tensors; returns the matplotlib Figure.

    The floating-point tensors (state_dict order) form a column, labelled on its left;
    the groups form a second column, labelled on its right, each joined to the tensors it
    permutes: a solid edge for axis 0 (outputs), dashed for axis 1 (inputs), dotted for
    other axes. Parameters no group touches are red; buffers are small grey squares. A long
    model is cut into several side-by-side columns (a group appears in each column it
    touches), so the figure stays about as high as wide; past ``MAX_PANELS * MAX_ROWS``
    tensors only the first are drawn and the title says so. Saved to ``path`` (PNG at
    100 dpi) when given.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    all_names = [n for n, info in spec.tensors.items() if info.floating]
    names = all_names[:MAX_PANELS * MAX_ROWS]
    shown = set(names)
    by_param = spec.members_by_param()
    touching = [g for g in spec.groups.values() if any(m.param in shown for m in g.members)]
    cmap = colormaps["tab20"]
    # dark tab20 shades first, so neighbouring groups differ clearly
    colour = {g.name: cmap((2 * i) % 20 + (i // 10) % 2) for i, g in enumerate(touching)}
    group_label = {g.name: _short(f"{g.name} ({g.size})") for g in touching}
    tensor_w = _width_in([_short(n) for n in names], LABEL_PT) + 0.15
    group_w = _width_in(list(group_label.values()), LABEL_PT) + 0.15
    panel_w = tensor_w + EDGE_IN + group_w + PANEL_GAP_IN

    def size(panels):
        rows = max([len(c) for c, _ in panels] + [len(g) for _, g in panels] + [1])
        width = max(6.0, len(panels) * panel_w + 2 * MARGIN_IN)
        return rows, width, max(3.0, rows * ROW_IN + HEADER_IN + FOOT_IN)

    for n_panels in range(1, MAX_PANELS + 1):
        panels = _panels(names, touching, n_panels)
        rows, width, height = size(panels)
        if rows <= MAX_ROWS and height <= TALLEST * width:
            break
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    styles = {0: "solid", 1: "dashed"}
    text = dict(fontsize=LABEL_PT, va="center", textcoords="offset points",
                annotation_clip=False)
    for k, (chunk, groups) in enumerate(panels):
        left = MARGIN_IN + k * panel_w + tensor_w
        bottom = height - HEADER_IN - rows * ROW_IN  # just below the title and legend
        ax = fig.add_axes((left / width, bottom / height, EDGE_IN / width,
                           rows * ROW_IN / height))
        ax.set_xlim(0, 1)
        ax.set_ylim(rows - 0.5, -0.5)
        ax.axis("off")
        y_t = {n: (i + 0.5) * rows / len(chunk) - 0.5 for i, n in enumerate(chunk)}
        y_g = {g.name: (j + 0.5) * rows / len(groups) - 0.5 for j, g in enumerate(groups)}
        for style in ("solid", "dashed", "dotted"):
            segs, cols = [], []
            for g in groups:
                for m in g.members:
                    if m.param in y_t and styles.get(m.axis, "dotted") == style:
                        segs.append([(0.0, y_t[m.param]), (1.0, y_g[g.name])])
                        cols.append(colour[g.name])
            if segs:
                ax.add_collection(LineCollection(segs, colors=cols, linestyles=style,
                                                 linewidths=0.9, alpha=0.8))
        params = [n for n in chunk if spec.tensors[n].is_parameter]
        for subset, face, edge, marker, area in (
                ([n for n in params if n in by_param], "#9ecae1", "k", "o", 22),
                ([n for n in params if n not in by_param], "#fb6a4a", "k", "o", 22),
                ([n for n in chunk if not spec.tensors[n].is_parameter], "#d9d9d9", "#737373",
                 "s", 12)):
            if subset:
                ax.scatter([0.0] * len(subset), [y_t[n] for n in subset], s=area, c=face,
                           marker=marker, edgecolors=edge, linewidths=0.5, zorder=3,
                           clip_on=False)
        if groups:
            ax.scatter([1.0] * len(groups), [y_g[g.name] for g in groups], s=40,
                       c=[colour[g.name] for g in groups], edgecolors="k", linewidths=0.6,
                       zorder=3, clip_on=False)
        for n in chunk:
            ax.annotate(_short(n), (0.0, y_t[n]), xytext=(-6, 0), ha="right", **text)
        for g in groups:
            ax.annotate(group_label[g.name], (1.0, y_g[g.name]), xytext=(6, 0), ha="left",
                        **text)
    handles = [Line2D([], [], color="k", linestyle="solid", label="axis 0 (outputs)"),
               Line2D([], [], color="k", linestyle="dashed", label="axis 1 (inputs)"),
               Line2D([], [], color="k", linestyle="dotted", label="other axis"),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="#9ecae1",
                      markeredgecolor="k", label="parameter, permuted"),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="#fb6a4a",
                      markeredgecolor="k", label="parameter, fixed"),
               Line2D([], [], marker="s", linestyle="", markerfacecolor="#d9d9d9",
                      markeredgecolor="#737373", label="buffer")]
    fig.legend(handles=handles, loc="upper center", fontsize=LABEL_PT, frameon=False,
               ncol=6 if width >= 10 else 3, bbox_to_anchor=(0.5, 1 - 0.42 / height))
    heading = title or (f"{len(spec.groups)} permutation groups over {len(all_names)} tensors, "
                        f"coverage {format_coverage(spec.coverage())}")
    if len(names) < len(all_names):
        heading += f" (the first {len(names)} of {len(all_names)} tensors drawn)"
    fig.text(0.5, 1 - 0.1 / height, heading, ha="center", va="top", fontsize=LABEL_PT + 2,
             wrap=True)
    if path is not None:
        from .io import atomic_write
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    return fig

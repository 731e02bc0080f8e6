"""Draw the figures of which axes of an N x C x (H*W) activation tensor each normalisation
averages over. Standard library only; the SVGs are deterministic.

* ``norm_axes.svg`` (the introduction): BatchNorm, LayerNorm, InstanceNorm, GroupNorm.
* ``norm_axes_all.svg`` (the alternatives chapter): one panel for BatchNorm and for each of
  the nine alternatives, those that share a set of cells grouped in a row.

    python book/figures/norm_axes.py
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "norm_axes.svg"
OUT_ALL = HERE / "norm_axes_all.svg"

N, C = 6, 6                       # cells along the batch and channel axes
CW, CH = 22, 84                   # width of one N cell, height of the H*W axis
DX, DY = 11, 8                    # oblique offset of one C cell (depth)
PANEL_W, PANEL_H = 300, 250
COLS = 2
FILL, EDGE, SHADE, SHADE_EDGE = "#ffffff", "#555555", "#3b82c4", "#1d4e80"
# Cells whose statistics only scale x (a second moment or a variance; x is not centred).
SCALE, SCALE_EDGE = "#e8772e", "#9a4512"
SCALE_LIGHT = "#f6c39f"

# name, (n0, n1), (c0, c1), note
PANELS = [
    ("BatchNorm", (0, N), (0, 1), "each channel over N, H, W"),
    ("LayerNorm", (0, 1), (0, C), "each sample over C, H, W"),
    ("InstanceNorm", (0, 1), (0, 1), "each sample and channel over H, W"),
    ("GroupNorm", (0, 1), (0, 2), "each sample and channel group over H, W"),
]

BN, IN, LN, GN = ((0, N), (0, 1)), ((0, 1), (0, 1)), ((0, 1), (0, C)), ((0, 1), (0, 2))
CENTRE = (SHADE, SHADE_EDGE, 0.75)
SCALE_ONLY = (SCALE, SCALE_EDGE, 0.8)
SCALE_BATCH = (SCALE_LIGHT, SCALE_EDGE, 0.9)

# name, [(cells, style), ...], note lines. Rows: batch statistics; one sample's statistics;
# variants of the per-sample ones; EvoNorm-B0, which uses both.
PANELS_ALL = [
    ("BatchNorm", [(BN, CENTRE)], ["each channel over N, H, W;", "eval: running averages"]),
    ("Batch Renormalization", [(BN, CENTRE)], ["as BatchNorm, then corrected by r, d", "towards the running averages"]),
    ("RunningBatchNorm", [(BN, CENTRE)], ["as BatchNorm, but running averages", "over batches, in training too"]),
    ("LayerNorm", [(LN, CENTRE)], ["each sample over C, H, W", "(one group of all channels)"]),
    ("InstanceNorm", [(IN, CENTRE)], ["each sample and channel", "over H, W"]),
    ("GroupNorm", [(GN, CENTRE)], ["each sample and channel group", "over H, W (1 group: LN; C: IN)"]),
    ("WS + GroupNorm", [(GN, CENTRE)], ["as GroupNorm; and each conv filter", "standardised over its C_in·k·k weights"]),
    ("FRN + TLU", [(IN, SCALE_ONLY)], ["as InstanceNorm, but only the mean", "of x², no centring; then max(y, τ)"]),
    ("EvoNorm-S0", [(GN, SCALE_ONLY)], ["group std as GroupNorm, x not centred:", "x·sigmoid(v·x) / std"]),
    ("EvoNorm-B0", [(BN, SCALE_BATCH), (IN, SCALE_ONLY)],
     ["x / max(batch std over N, H, W (light),", "v·x + instance std over H, W (dark))"]),
]


def _pt(ox: float, oy: float, n: float, c: float, h: float) -> tuple[float, float]:
    """Oblique projection: n to the right, c into the page (up-right), h upwards."""
    return ox + n * CW + c * DX, oy - h * CH - c * DY


def _poly(points, fill, stroke, width=1.0, opacity=1.0) -> str:
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    op = f' fill-opacity="{opacity}"' if opacity != 1.0 else ""
    return f'<polygon points="{pts}" fill="{fill}"{op} stroke="{stroke}" stroke-width="{width}" stroke-linejoin="round"/>'


def _box(ox, oy, n0, n1, c0, c1, fill, stroke, width=1.0, opacity=1.0, grid=False) -> list[str]:
    """The three visible faces (front, top, right) of the box [n0,n1] x [c0,c1] x [0,1]."""
    p = lambda n, c, h: _pt(ox, oy, n, c, h)  # noqa: E731
    front = [p(n0, c0, 0), p(n1, c0, 0), p(n1, c0, 1), p(n0, c0, 1)]
    top = [p(n0, c0, 1), p(n1, c0, 1), p(n1, c1, 1), p(n0, c1, 1)]
    right = [p(n1, c0, 0), p(n1, c1, 0), p(n1, c1, 1), p(n1, c0, 1)]
    out = [_poly(f, fill, stroke, width, opacity) for f in (front, top, right)]
    if grid:  # the cell lines of the whole tensor
        line = lambda a, b: (f'<line x1="{a[0]:.1f}" y1="{a[1]:.1f}" x2="{b[0]:.1f}" y2="{b[1]:.1f}" '  # noqa: E731
                             f'stroke="{stroke}" stroke-width="0.5"/>')
        out += [line(p(n, c0, 0), p(n, c0, 1)) for n in range(n0 + 1, n1)]
        out += [line(p(n, c0, 1), p(n, c1, 1)) for n in range(n0 + 1, n1)]
        out += [line(p(n0, c, 1), p(n1, c, 1)) for c in range(c0 + 1, c1)]
        out += [line(p(n1, c, 0), p(n1, c, 1)) for c in range(c0 + 1, c1)]
    return out


def _shade(ox, oy, ns, cs, style=CENTRE) -> list[str]:
    """Shade the cells [n0,n1] x [c0,c1] (all of H*W) where they meet the tensor's visible surface."""
    p = lambda n, c, h: _pt(ox, oy, n, c, h)  # noqa: E731
    (n0, n1), (c0, c1) = ns, cs
    faces = [[p(n0, c0, 1), p(n1, c0, 1), p(n1, c1, 1), p(n0, c1, 1)]]  # top
    if c0 == 0:
        faces.append([p(n0, 0, 0), p(n1, 0, 0), p(n1, 0, 1), p(n0, 0, 1)])  # front
    if n1 == N:
        faces.append([p(N, c0, 0), p(N, c1, 0), p(N, c1, 1), p(N, c0, 1)])  # right
    fill, edge, opacity = style
    return [_poly(f, fill, edge, 1.2, opacity) for f in faces]


def _text(x, y, s, size=13, anchor="middle", weight="normal", style="normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
            f'font-style="{style}">{s}</text>')


def _panel(x0, y0, width, height, name, shades, notes, note_size=14) -> list[str]:
    """One tensor with its shaded cells, a title above and note lines below."""
    ox, oy = x0 + 65, y0 + 190
    out = [_text(x0 + width / 2, y0 + 28, name, size=18, weight="bold")]
    out += _box(ox, oy, 0, N, 0, C, FILL, EDGE, grid=True)
    for (ns, cs), style in shades:
        out += _shade(ox, oy, ns, cs, style)
    # axis labels
    x, y = _pt(ox, oy, N / 2, 0, 0)
    out.append(_text(x, y + 20, "N (batch)", size=15, style="italic"))
    x, y = _pt(ox, oy, 0, 0, 0.5)
    out.append(_text(x - 8, y + 5, "H·W", size=15, anchor="end", style="italic"))
    x, y = _pt(ox, oy, N, C / 2, 0)
    out.append(_text(x + 8, y + 12, "C", size=15, anchor="start", style="italic"))
    for i, line in enumerate(notes):
        out.append(_text(x0 + width / 2, y0 + height - 14 - 18 * (len(notes) - 1 - i), line, size=note_size))
    return out


def panel(ix: int, name: str, ns, cs, note: str) -> list[str]:
    """Panel ``ix`` of the introduction's figure."""
    x0, y0 = (ix % COLS) * PANEL_W, (ix // COLS) * PANEL_H
    return _panel(x0, y0, PANEL_W, PANEL_H, name, [((ns, cs), CENTRE)], [note])


def _document(width, height, title, desc, body) -> str:
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'font-family="Helvetica, Arial, sans-serif" fill="#222222" role="img" '
        f'aria-labelledby="title desc">',
        f"<title id=\"title\">{title}</title>",
        f"<desc id=\"desc\">{desc}</desc>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        *body,
        "</svg>",
        "",
    ])


def svg() -> str:
    """The introduction's figure: the four classic normalisations."""
    rows = -(-len(PANELS) // COLS)
    width, height = PANEL_W * COLS, PANEL_H * rows
    body = [p for i, (name, ns, cs, note) in enumerate(PANELS) for p in panel(i, name, ns, cs, note)]
    return _document(
        width, height, "Which axes each normalisation averages over",
        "Four copies of an activation tensor drawn as a box with a batch axis N, a channel axis C "
        "and a spatial axis H times W. The shaded cells share one mean and one variance: BatchNorm shades one "
        "channel across the whole batch; LayerNorm one sample across all channels; InstanceNorm one sample and one "
        "channel; GroupNorm one sample and a group of channels.", body)


ALL_COLS, ALL_PANEL_H = 3, 282


def _swatch(x, y, style, label) -> list[str]:
    fill, edge, opacity = style
    return [f'<rect x="{x}" y="{y - 13}" width="26" height="16" fill="{fill}" fill-opacity="{opacity}" '
            f'stroke="{edge}" stroke-width="1.2"/>', _text(x + 36, y, label, size=14, anchor="start")]


def svg_all() -> str:
    """The alternatives chapter's figure: BatchNorm and the nine alternatives, plus a legend."""
    rows = -(-(len(PANELS_ALL) + 2) // ALL_COLS)  # two cells for the legend
    width, height = PANEL_W * ALL_COLS, ALL_PANEL_H * rows
    body = []
    for i, (name, shades, notes) in enumerate(PANELS_ALL):
        x0, y0 = (i % ALL_COLS) * PANEL_W, (i // ALL_COLS) * ALL_PANEL_H
        body += _panel(x0, y0, PANEL_W, ALL_PANEL_H, name, shades, notes, note_size=13)
    i = len(PANELS_ALL)
    x0, y0 = (i % ALL_COLS) * PANEL_W + 30, (i // ALL_COLS) * ALL_PANEL_H + 70
    body.append(_text(x0, y0, "Shaded: the cells whose statistics normalise one value", size=15,
                      anchor="start", weight="bold"))
    body += _swatch(x0, y0 + 36, CENTRE, "mean and variance: x is centred and scaled")
    body += _swatch(x0, y0 + 66, SCALE_ONLY, "second moment or variance only: x is scaled,")
    body.append(_text(x0 + 36, y0 + 84, "not centred", size=14, anchor="start"))
    body += _swatch(x0, y0 + 114, SCALE_BATCH, "EvoNorm-B0's batch variance (the dark cells")
    body.append(_text(x0 + 36, y0 + 132, "on top: its instance variance)", size=14, anchor="start"))
    body.append(_text(x0, y0 + 168, "Every method then scales and shifts each channel by learned γ, β.",
                      size=14, anchor="start", style="italic"))
    return _document(
        width, height, "Which cells of the activation tensor each normalisation uses",
        "Ten copies of an activation tensor drawn as a box with a batch axis N, a channel axis C and a spatial "
        "axis H times W. First row, the batch-dependent methods: BatchNorm, Batch Renormalization and "
        "RunningBatchNorm all shade one channel across the whole batch. Second row: LayerNorm shades one sample "
        "across all channels, InstanceNorm one sample and one channel, GroupNorm one sample and a group of "
        "channels. Third row: Weight Standardization plus GroupNorm shades as GroupNorm; Filter Response "
        "Normalization shades as InstanceNorm and EvoNorm-S0 as GroupNorm, in orange, because they only divide "
        "by a second moment or a standard deviation and do not subtract a mean. Last row: EvoNorm-B0 shades one "
        "channel across the batch in light orange (its batch variance) and one sample and channel in dark "
        "orange (its instance variance).", body)


if __name__ == "__main__":
    OUT.write_text(svg(), encoding="utf-8")
    OUT_ALL.write_text(svg_all(), encoding="utf-8")
    print(f"wrote {OUT} and {OUT_ALL}")

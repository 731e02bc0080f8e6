"""Draw book/figures/norm_axes.svg: which axes of an N x C x (H*W) activation tensor each
normalisation averages over. Standard library only; the SVG is deterministic.

    python book/figures/norm_axes.py
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).with_name("norm_axes.svg")

N, C = 6, 6                       # cells along the batch and channel axes
CW, CH = 22, 84                   # width of one N cell, height of the H*W axis
DX, DY = 11, 8                    # oblique offset of one C cell (depth)
PANEL_W, PANEL_H = 300, 250
COLS = 2
FILL, EDGE, SHADE, SHADE_EDGE = "#ffffff", "#555555", "#3b82c4", "#1d4e80"

# name, (n0, n1), (c0, c1), note
PANELS = [
    ("BatchNorm", (0, N), (0, 1), "each channel over N, H, W"),
    ("LayerNorm", (0, 1), (0, C), "each sample over C, H, W"),
    ("InstanceNorm", (0, 1), (0, 1), "each sample and channel over H, W"),
    ("GroupNorm", (0, 1), (0, 2), "each sample and channel group over H, W"),
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


def _shade(ox, oy, ns, cs) -> list[str]:
    """Shade the cells [n0,n1] x [c0,c1] (all of H*W) where they meet the tensor's visible surface."""
    p = lambda n, c, h: _pt(ox, oy, n, c, h)  # noqa: E731
    (n0, n1), (c0, c1) = ns, cs
    faces = [[p(n0, c0, 1), p(n1, c0, 1), p(n1, c1, 1), p(n0, c1, 1)]]  # top
    if c0 == 0:
        faces.append([p(n0, 0, 0), p(n1, 0, 0), p(n1, 0, 1), p(n0, 0, 1)])  # front
    if n1 == N:
        faces.append([p(N, c0, 0), p(N, c1, 0), p(N, c1, 1), p(N, c0, 1)])  # right
    return [_poly(f, SHADE, SHADE_EDGE, 1.2, 0.75) for f in faces]


def _text(x, y, s, size=13, anchor="middle", weight="normal", style="normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
            f'font-style="{style}">{s}</text>')


def panel(ix: int, name: str, ns, cs, note: str) -> list[str]:
    x0, y0 = (ix % COLS) * PANEL_W, (ix // COLS) * PANEL_H
    ox, oy = x0 + 65, y0 + 190
    out = [_text(x0 + PANEL_W / 2, y0 + 28, name, size=18, weight="bold")]
    out += _box(ox, oy, 0, N, 0, C, FILL, EDGE, grid=True)
    out += _shade(ox, oy, ns, cs)
    # axis labels
    x, y = _pt(ox, oy, N / 2, 0, 0)
    out.append(_text(x, y + 20, "N (batch)", size=15, style="italic"))
    x, y = _pt(ox, oy, 0, 0, 0.5)
    out.append(_text(x - 8, y + 5, "H·W", size=15, anchor="end", style="italic"))
    x, y = _pt(ox, oy, N, C / 2, 0)
    out.append(_text(x + 8, y + 12, "C", size=15, anchor="start", style="italic"))
    out.append(_text(x0 + PANEL_W / 2, y0 + PANEL_H - 14, note, size=14))
    return out


def svg() -> str:
    rows = -(-len(PANELS) // COLS)
    width, height = PANEL_W * COLS, PANEL_H * rows
    body = [p for i, (name, ns, cs, note) in enumerate(PANELS) for p in panel(i, name, ns, cs, note)]
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'font-family="Helvetica, Arial, sans-serif" fill="#222222" role="img" '
        f'aria-labelledby="title desc">',
        "<title id=\"title\">Which axes each normalisation averages over</title>",
        "<desc id=\"desc\">Four copies of an activation tensor drawn as a box with a batch axis N, a channel axis C "
        "and a spatial axis H times W. The shaded cells share one mean and one variance: BatchNorm shades one "
        "channel across the whole batch; LayerNorm one sample across all channels; InstanceNorm one sample and one "
        "channel; GroupNorm one sample and a group of channels.</desc>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        *body,
        "</svg>",
        "",
    ])


if __name__ == "__main__":
    OUT.write_text(svg(), encoding="utf-8")
    print(f"wrote {OUT}")

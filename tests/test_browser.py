"""The built book in a real browser: headless Debian Chromium driven by Playwright.

Every request that does not go to the local test server is aborted, so a page that needs a
CDN fails here. On each page of the book: no console error, no request to another host, and
no display equation or code block wider than the column. On each chapter (the notebooks in
_toc.yml): every result table is there, the tabs switch between the networks' tables, every
altair chart has drawn its marks, no printed output is cut at the column's edge, a
screenshot is saved in _build/screenshots/, and every result table's text is legible (WCAG
AA contrast) in the theme's light and dark modes. At a phone's 390 px every chart fits its
column (laid out again) and is drawn as designed again when the window widens, and a table
that scrolls keeps its caption and its first column in sight.

Needs /usr/bin/chromium (Debian: `apt-get install -y chromium`; never `playwright install`).
Without it the test is skipped, unless CI is set, where it fails.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from book_helpers import REPO, book_pages, chapter_pages, expected_tables

CHROMIUM = Path(os.environ.get("NORMKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = REPO / "_build" / "screenshots"
TIMEOUT_MS = 30_000


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, so the browser test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(book_build):
    """The built HTML on an HTTP server at 127.0.0.1 (a free port), for the module."""
    if not (book_build.html / "index.html").is_file():
        pytest.fail(f"the book did not build (exit {book_build.returncode}):\n{book_build.log[-3000:]}")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(book_build.html)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} not found; install it with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed (`uv sync`)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class PageLog:
    """What a page did: console errors, uncaught exceptions, aborted and failed requests."""

    def __init__(self, page, base: str):
        self.errors: list[str] = []
        self.blocked: list[str] = []
        self.failed: list[str] = []
        host = urlparse(base).netloc
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text} ({m.location.get('url', '')})")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})")
                if urlparse(r.url).netloc == host else None)

        def route(r):
            url = urlparse(r.request.url)
            if url.scheme in ("data", "blob", "about") or url.netloc == host:
                r.continue_()
            else:
                self.blocked.append(r.request.url)
                r.abort()

        page.route("**/*", route)


def _open(browser, server: str, page_name: str, theme: str | None = None, width: int = 1280):
    """The page in a new browser context ``width`` px wide; ``theme`` ('light' or 'dark'): the
    colour mode the theme's switch would have stored."""
    context = browser.new_context(viewport={"width": width, "height": 900}, service_workers="block")
    if theme:
        context.add_init_script(f"localStorage.setItem('mode', '{theme}'); localStorage.setItem('theme', '{theme}');")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log = PageLog(page, server)
    page.goto(f"{server}/{page_name}.html", wait_until="load")
    page.wait_for_load_state("networkidle")
    return context, page, log


# the start of each display equation and code block that is wider than its box (it scrolls);
# printed outputs are the chapter test's (_CUT_OUTPUTS)
_WIDE_BLOCKS = """() => [...document.querySelectorAll(
        'mjx-container[display="true"], div.highlight pre:not(div.cell_output pre)')]
    .filter((e) => e.scrollWidth > e.clientWidth + 1)
    .map((e) => `${e.tagName === 'PRE' ? 'code' : 'equation'} ${e.scrollWidth} px in ${e.clientWidth} px: `
        + e.textContent.trim().slice(0, 40))"""


@pytest.mark.parametrize("page_name", book_pages())
def test_page_has_no_errors_needs_no_other_host_and_fits_the_column(browser, server, page_name):
    """The page loads cleanly, and at 1280 px no display equation or code block scrolls
    sideways to be read."""
    context, page, log = _open(browser, server, page_name)
    try:
        if page.locator("mjx-container, .math").count():
            page.wait_for_function("() => !document.querySelector('.math') || document.querySelector('mjx-container')")
            page.evaluate("() => window.MathJax.startup.promise")
        assert not log.blocked, f"{page_name} requested other hosts: {log.blocked}"
        assert not log.failed, f"{page_name}: local requests failed: {log.failed}"
        assert not log.errors, f"{page_name}: " + "\n".join(log.errors)
        wide = page.evaluate(_WIDE_BLOCKS)
        assert not wide, f"{page_name}: wider than the column at 1280 px: {wide}"
    finally:
        context.close()


# -- chapters -------------------------------------------------------------------------------

_CHART_MARKS = """(box) => {
    const view = box.normkitView;
    if (!view) return -1;
    let n = 0;
    const walk = (mark) => {
        for (const item of mark.items || []) {
            if (mark.marktype === 'group') (item.items || []).forEach(walk);
            else if (mark.role === 'mark') n += 1;
        }
    };
    walk(view.scenegraph().root);
    return n;
}"""

_CANVAS_INKED = """(canvas) => {
    const ctx = canvas.getContext('2d');
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) return true;
    return false;
}"""


# the first line of each printed output (stream or plain text) that is wider than its box
_CUT_OUTPUTS = """() => [...document.querySelectorAll('div.cell_output div.output pre')]
    .filter((pre) => pre.scrollWidth > pre.clientWidth + 1)
    .map((pre) => pre.textContent.split('\\n').reduce((a, b) => (b.length > a.length ? b : a)).slice(0, 80))"""


# a chart's drawn width and the width of the cell output it is drawn in
_CHART_ROOM = """(surface) => [surface.getBoundingClientRect().width,
    surface.closest('div.cell_output, div.output').getBoundingClientRect().width]"""

# the texts of a chart's titles that vega-embed's "..." menu covers
_UNDER_MENU = """(box) => {
    const menu = box.querySelector('.vega-embed details > summary');
    if (!menu) return [];
    const m = menu.getBoundingClientRect();
    return [...box.querySelectorAll('.role-title-text text, .role-title-subtitle text')].filter((t) => {
        const r = t.getBoundingClientRect();
        return r.right > m.left && r.left < m.right && r.bottom > m.top && r.top < m.bottom;
    }).map((t) => t.textContent);
}"""

# the opacity of each legend swatch drawn under 0.9 (a legend's colours must be readable)
_FAINT_SWATCHES = """(box) => [...box.querySelectorAll('.role-legend-symbol path')]
    .map((e) => Number(e.getAttribute('opacity') ?? 1)).filter((o) => o < 0.9)"""

# whether a table fits its box (normkit's tables scroll sideways when they do not)
_FITS = "(t) => t.scrollWidth <= t.clientWidth + 1"


def _check_tabs(page, page_name: str) -> int:
    """Each Tab widget: clicking 'ResNet18' shows its table only, 'CNN' brings the CNN one back."""
    tabs = page.locator(".jupyter-widgets.widget-tab")
    for i in range(tabs.count()):
        tab = tabs.nth(i)
        titles = [t.strip() for t in tab.locator(".lm-TabBar-tab .lm-TabBar-tabLabel").all_inner_texts()]
        assert titles, f"{page_name}: tab widget {i} has no tabs"
        panels = tab.locator(".widget-tab-contents > *")
        assert panels.count() == len(titles), f"{page_name}: tab widget {i}: {len(titles)} tabs, {panels.count()} panels"
        order = [t for t in ("ResNet18", "CNN") if t in titles] or titles[:2]
        for title in order:
            tab.locator(".lm-TabBar-tab", has_text=title).first.click()
            k = titles.index(title)
            for j in range(len(titles)):
                table = panels.nth(j).locator("table.normkit-table")
                if not table.count():
                    continue
                if j == k:
                    table.first.wait_for(state="visible")
                    assert table.first.evaluate(_FITS), (
                        f"{page_name}: tab {title!r}'s table is wider than the column at 1280 px (it scrolls)")
                    caption = table.first.locator("caption")
                    if caption.count():
                        assert title in caption.inner_text(), (
                            f"{page_name}: tab {title!r} shows a table captioned {caption.inner_text()!r}")
                else:
                    table.first.wait_for(state="hidden")
    return tabs.count()


def _drawn_chart(page, page_name: str, charts, i: int, where: str):
    """Chart ``i`` once drawn: (its box, its svg or canvas), checked to have marks, to fit its
    output and to have no title under its menu; ``where`` (e.g. 'at 390 px') goes in the messages."""
    box = charts.nth(i)
    page.wait_for_function("(b) => b.dataset.normkitStatus", arg=box.element_handle())
    assert box.get_attribute("data-normkit-status") == "drawn", f"{page_name}: chart {i} failed to draw {where}"
    surface = box.locator(".vega-embed svg.marks, .vega-embed canvas.marks, .vega-embed svg, .vega-embed canvas").first
    assert surface.count(), f"{page_name}: chart {i} has no svg or canvas {where}"
    assert box.evaluate(_CHART_MARKS) > 0, f"{page_name}: chart {i} has no marks {where}"
    width, room = surface.evaluate(_CHART_ROOM)
    assert width <= room + 1, f"{page_name}: chart {i} is {width:.0f} px wide {where}, its output {room:.0f} px (cut)"
    assert not box.evaluate(_UNDER_MENU), f"{page_name}: chart {i}'s menu covers its title {where}"
    return box, surface


@pytest.mark.parametrize("page_name", chapter_pages())
def test_chapter_tables_tabs_and_charts(browser, server, page_name):
    context, page, log = _open(browser, server, page_name)
    try:
        want = expected_tables(page_name)
        if want:
            page.wait_for_function(f"() => document.querySelectorAll('table.normkit-table').length >= {want}")
        assert page.locator("table.normkit-table").count() == want, f"{page_name}: not every result table rendered"
        n_tabs = _check_tabs(page, page_name)
        if want:
            assert n_tabs, f"{page_name}: result tables but no tab widget rendered"

        charts = page.locator("div.normkit-vega")
        for i in range(charts.count()):
            box, surface = _drawn_chart(page, page_name, charts, i, "at 1280 px")
            faint = box.evaluate(_FAINT_SWATCHES)
            assert not faint, f"{page_name}: chart {i}'s legend swatches are faint before any pick: {faint}"
            if surface.evaluate("(e) => e.tagName") == "CANVAS":
                assert surface.evaluate(_CANVAS_INKED), f"{page_name}: chart {i}'s canvas is blank"
            else:
                assert surface.locator(".role-mark > *").count(), f"{page_name}: chart {i}'s svg has no marks"

        cut = page.evaluate(_CUT_OUTPUTS)
        assert not cut, f"{page_name}: printed output wider than the column (cut at its edge): {cut}"

        page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{page_name.replace('/', '__')}.png"), full_page=True)
        assert not log.blocked, f"{page_name} requested other hosts: {log.blocked}"
        assert not log.errors, f"{page_name}: " + "\n".join(log.errors)
    finally:
        context.close()


# the start of each visible result table's caption that runs past the table's visible box
_CUT_CAPTIONS = """() => [...document.querySelectorAll('table.normkit-table')].filter((t) => t.offsetParent).filter((t) => {
    const c = t.querySelector('caption');
    return c && c.getBoundingClientRect().right > t.getBoundingClientRect().right + 1;
}).map((t) => t.querySelector('caption').textContent.slice(0, 60))"""

# the start of the caption of each visible result table that scrolls, whose first column (the
# method, or the batch size) goes out of sight when the table is scrolled to its right end
_LOST_FIRST_COLUMN = """() => [...document.querySelectorAll('table.normkit-table')].filter((t) => t.offsetParent
        && t.scrollWidth > t.clientWidth + 1).filter((t) => {
    t.scrollLeft = t.scrollWidth;
    const left = t.getBoundingClientRect().left;
    const lost = [...t.querySelectorAll('tr > :first-child')].some((c) => c.getBoundingClientRect().left < left - 1);
    t.scrollLeft = 0;
    return lost;
}).map((t) => (t.querySelector('caption') || t).textContent.slice(0, 60))"""


@pytest.mark.parametrize("page_name", chapter_pages())
def test_charts_and_tables_fit_a_phone(browser, server, page_name):
    """At a phone's 390 px every chart fits its column, its menu covering none of its title: a
    chart designed wider is laid out again (panels one under the other, titles wrapped, legends
    below; normkit-vega.js), instead of scrolling sideways with its right half out of sight. A
    table wider than the column scrolls, but its caption wraps in the part in sight and its first
    column stays in sight."""
    context, page, log = _open(browser, server, page_name, width=390)
    try:
        charts = page.locator("div.normkit-vega")
        for i in range(charts.count()):
            _drawn_chart(page, page_name, charts, i, "at 390 px")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, f"{page_name}: the page scrolls sideways"
        cut = page.evaluate(_CUT_CAPTIONS)
        assert not cut, f"{page_name}: at 390 px these tables' captions run past the part of the table in sight: {cut}"
        lost = page.evaluate(_LOST_FIRST_COLUMN)
        assert not lost, f"{page_name}: at 390 px these tables, scrolled, hide their first column: {lost}"
        if charts.count():  # the phone turned sideways, or the window made wider: drawn again, as designed
            page.set_viewport_size({"width": 1280, "height": 900})
            page.wait_for_function("() => [...document.querySelectorAll('div.normkit-vega')].every((b) => "
                                   "b.dataset.normkitStatus === 'drawn' && b.dataset.normkitLayout === 'as designed')")
        assert not log.errors, f"{page_name}: " + "\n".join(log.errors)
    finally:
        context.close()


# the text of each result table cell, head and caption, and of each chart, whose colour has less
# than WCAG AA's 4.5:1 contrast with the background it is drawn on (ancestors' backgrounds
# composited); in dark mode also each chart's lines and ticks with less than 3:1, and any chart
# drawn on a light background
_LOW_CONTRAST = """() => {
    const parse = (c) => { const m = c.match(/[\\d.]+/g).map(Number); return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; };
    const over = (top, below) => top.slice(0, 3).map((v, i) => v * top[3] + below[i] * (1 - top[3])).concat([1]);
    const background = (el) => {
        const layers = [];
        for (let x = el; x; x = x.parentElement) {
            const c = parse(getComputedStyle(x).backgroundColor);
            if (c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
        }
        return layers.reverse().reduce((below, layer) => over(layer, below), [255, 255, 255, 1]);
    };
    const luminance = (c) => {
        const [r, g, b] = c.slice(0, 3).map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b;
    };
    const low = [];
    const ratio = (fg, bg) => {
        const [a, b] = [luminance(over(fg, bg)), luminance(bg)];
        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    };
    // each chart's texts (titles, axis and legend labels, messages) against what it is drawn on;
    // in dark mode that must be dark too: no light patch, no grey box
    const ctx = document.createElement('canvas').getContext('2d');
    const rgba = (c, alpha) => { ctx.fillStyle = '#000'; ctx.fillStyle = c; ctx.fillRect(0, 0, 1, 1);
        const d = ctx.getImageData(0, 0, 1, 1).data; ctx.clearRect(0, 0, 1, 1); return [d[0], d[1], d[2], alpha * d[3] / 255]; };
    for (const box of document.querySelectorAll('div.normkit-vega')) {
        const view = box.normkitView;
        if (!view) { low.push(`a chart not drawn (${box.dataset.normkitStatus})`); continue; }
        let bg = background(box.querySelector('.normkit-vega-view'));
        const own = view.background();
        if (own && own !== 'transparent') bg = over(rgba(own, 1), bg);
        const dark = document.documentElement.dataset.theme === 'dark';
        if (dark && luminance(bg) > 0.2)
            low.push(`a chart on a light background in dark mode (${bg.slice(0, 3).map(Math.round)})`);
        const walk = (mark) => {
            for (const item of mark.items || []) {
                if (mark.marktype === 'group') (item.items || []).forEach(walk);
                else if (dark && mark.role === 'mark' && (mark.marktype === 'rule' || mark.marktype === 'rect')) {
                    // a data mark drawn as a line or a tick (e.g. a mean and its spread): WCAG's
                    // 3:1 for graphics, in dark mode, where a black one would vanish
                    const ink = mark.marktype === 'rule' ? item.stroke : item.fill;
                    if (!ink || (item.opacity ?? 1) < 1) continue;  // a faint band is decoration
                    const r = ratio(rgba(ink, 1), bg);
                    if (r < 3) low.push(`chart ${mark.marktype} ${ink} (${r.toFixed(2)}:1)`);
                }
                else if (mark.marktype === 'text' && item.text && item.fill) {
                    const fg = rgba(item.fill, (item.opacity ?? 1) * (item.fillOpacity ?? 1));
                    if (fg[3] === 0) continue;  // not drawn (e.g. an axis label hidden where labels overlap)
                    const r = ratio(fg, bg);
                    if (r < 4.5) low.push(`chart text ${String(item.text).slice(0, 40)} (${r.toFixed(2)}:1)`);
                }
            }
        };
        walk(view.scenegraph().root);
    }
    for (const el of document.querySelectorAll('table.normkit-table :is(td, th, caption)')) {
        const text = el.textContent.trim();
        if (!text) continue;
        const bg = background(el);
        const [a, b] = [luminance(over(parse(getComputedStyle(el).color), bg)), luminance(bg)];
        const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
        if (ratio < 4.5) low.push(`${text.slice(0, 40)} (${ratio.toFixed(2)}:1)`);
    }
    return low;
}"""


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("page_name", chapter_pages())
def test_tables_and_charts_are_legible_in_both_colour_modes(browser, server, page_name, theme):
    """Every figure of every result table (in either tab) and every text of every chart contrasts
    with its background, in the theme's light and dark modes (in dark mode the tab widgets take
    the page's dark colours, and the charts are drawn dark, on the page's background)."""
    context, page, log = _open(browser, server, page_name, theme)
    try:
        assert page.evaluate("document.documentElement.dataset.theme") == theme
        want = expected_tables(page_name)
        if want:
            page.wait_for_function(f"() => document.querySelectorAll('table.normkit-table').length >= {want}")
        charts = page.locator("div.normkit-vega")
        for i in range(charts.count()):
            page.wait_for_function("(b) => b.dataset.normkitStatus", arg=charts.nth(i).element_handle())
        low = page.evaluate(_LOW_CONTRAST)
        assert not low, (f"{page_name}, {theme} mode: {len(low)} table or chart marks below WCAG contrast "
                         f"(4.5:1 text, 3:1 graphics), e.g. {low[:5]}")
    finally:
        context.close()

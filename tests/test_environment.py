"""environment.yml (conda, Binder) must describe the environment that uv.lock pins.

Regenerate it after `uv lock` with:  uv run python tests/test_environment.py --write
"""

import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADER = """\
# The environment of uv.lock, for conda and Binder users: every direct dependency of
# pyproject.toml pinned to the version uv.lock resolved. Generated; do not edit by hand:
#     uv run python tests/test_environment.py --write
# (tests/test_environment.py checks that it agrees with uv.lock).
"""


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def direct_dependencies() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = list(project["project"]["dependencies"])
    for extra in project["project"].get("optional-dependencies", {}).values():
        reqs += extra
    for group in project.get("dependency-groups", {}).values():
        reqs += [r for r in group if isinstance(r, str)]
    return sorted({_name(r) for r in reqs} - {"normkit"})


def locked_versions() -> dict[str, str]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return {p["name"]: p["version"] for p in lock["package"] if "version" in p}


def expected() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    python = re.search(r"\d+\.\d+", project["project"]["requires-python"]).group(0)
    locked = locked_versions()
    pins = "\n".join(f"      - {n}=={locked[n]}" for n in direct_dependencies())
    return (f"{HEADER}name: normkit\nchannels:\n  - conda-forge\ndependencies:\n  - python={python}\n  - pip\n"
            f"  - pip:\n{pins}\n      - -e .\n")


def test_environment_yml_matches_uv_lock():
    actual = (REPO / "environment.yml").read_text()
    assert actual == expected(), "environment.yml is stale: run `uv run python tests/test_environment.py --write`"


def test_every_direct_dependency_is_locked():
    locked = locked_versions()
    assert not [n for n in direct_dependencies() if n not in locked]


if __name__ == "__main__" and "--write" in sys.argv:
    (REPO / "environment.yml").write_text(expected())
    print("wrote environment.yml")

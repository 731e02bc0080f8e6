"""Test helper: a checkpoint summary that says a run is part-made, without training it."""

from __future__ import annotations

import json
from pathlib import Path

from normkit.runs import Checkpoints, RunConfig


def part_made(root: Path, config: RunConfig, epochs_done: int) -> None:
    """Write in ``root`` the summary of a checkpoint of ``config`` after ``epochs_done`` epochs.

    The summary is all that a sweep plans by (what to resume, what is left); no weights are written,
    so only dry runs and status may read it.
    """
    summary = Checkpoints(root).paths(config)[1]
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({"key": config.key, "epochs_done": epochs_done}))

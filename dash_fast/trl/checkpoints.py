"""TRL's checkpoint layout beside the core's checkpoints/step-N directories."""

from __future__ import annotations

import os


def link_checkpoint(output_dir: str, step: int, path: str) -> None:
    """`output_dir/checkpoint-N`, TRL's name, as a relative link to the core's checkpoint `path` of step N; links
    whose checkpoint is gone (removed by `save_total_limit`) are dropped."""
    link = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.relpath(path, output_dir), link)
    for name in os.listdir(output_dir):
        entry = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and os.path.islink(entry) and not os.path.exists(entry):
            os.remove(entry)

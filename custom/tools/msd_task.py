"""Show the recipe this collection chooses for an MSD task folder, and set a metadata.json to it.

python -m custom.tools.msd_task --dataset_dir /data/Task01_BrainTumour [--write_metadata configs/metadata.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from custom.segmentation.msd import TaskError, load_task, metadata_for_task


def main(argv: list[str] | None = None) -> int:
    """``python -m custom.tools.msd_task --dataset_dir /data/Task01_BrainTumour [--write_metadata configs/metadata.json]``.

    Prints the task's recipe as JSON; with ``--write_metadata`` also sets that metadata.json's network
    input/output channels and class names to the task's (so MONAI Label and the model zoo checks see them).
    """
    parser = argparse.ArgumentParser(
        prog="python -m custom.tools.msd_task", description="show the recipe chosen for an MSD task folder"
    )
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--write_metadata", default=None, help="a bundle metadata.json to update for this task")
    args = parser.parse_args(argv)
    try:
        recipe = load_task(args.dataset_dir)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(recipe.as_dict(), indent=4))
    if args.write_metadata:
        path = Path(args.write_metadata)
        path.write_text(
            json.dumps(metadata_for_task(json.loads(path.read_text(encoding="utf-8")), recipe), indent=4) + "\n",
            encoding="utf-8",
        )
        print(f"updated {path} for {recipe.name}: {recipe.in_channels} input, {recipe.out_channels} output channels")
    return 0


if __name__ == "__main__":
    sys.exit(main())

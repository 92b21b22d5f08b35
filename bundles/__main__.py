"""``python -m bundles <command>``: the collection's tools. Commands: demo, package, index, download, recipe_table."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": "bundles.demo",
    "package": "bundles.package",
    "index": "bundles.package",
    "download": "bundles.package",
    "recipe_table": "bundles.recipe_table",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m bundles {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv if module.__name__ == "bundles.package" else argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bundles <command>``: the collection's tools. Commands: demo."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "bundles.demo"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m bundles {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

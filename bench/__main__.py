"""`python -m bench [NAME] [options]`: run one benchmark (default: audience).

NAME is a module of this package with a `main(argv) -> int` (e.g. `audience`); its options
follow it: `python -m bench audience --sizes 1000000`.
"""

from __future__ import annotations

import importlib
import sys

from bench import audience


def main(argv: list[str]) -> int:
    """Dispatch to a benchmark; `_child` is the audience benchmark's per-measurement entry."""
    if argv and argv[0] == "_child":
        return audience.child_main(argv[1:])
    if not argv or argv[0].startswith("-"):
        return audience.main(argv)
    name, rest = argv[0], argv[1:]
    if not name.isidentifier():
        print(f"unknown benchmark {name!r}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError:
        print(f"unknown benchmark {name!r} (no module bench/{name}.py)", file=sys.stderr)
        return 2
    if not hasattr(module, "main"):
        print(f"bench/{name}.py has no main(argv)", file=sys.stderr)
        return 2
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Print the project's requirements from pyproject.toml, one a line, for `pip install -r`.

The Dockerfile installs dependencies in a layer of their own, before the source is copied,
so editing code reuses that layer; this gives it the list pip would otherwise read from the
package. Extras that name the project itself (`carousel[train,bench]`) are followed.

    python requirements.py pyproject.toml [EXTRA ...]
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """[project].dependencies plus every requested extra, self-references expanded."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    self_ref = re.compile(rf"{re.escape(project['name'])}\[(?P<extras>[^\]]+)\]")
    out: list[str] = []
    todo: list[str | None] = [None, *extras]  # None: the base dependencies
    seen: set[str | None] = set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        for req in project.get("dependencies", []) if extra is None else optional[extra]:
            if m := self_ref.fullmatch(req.replace(" ", "")):
                todo.extend(m["extras"].split(","))
            elif req not in out:
                out.append(req)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    pyproject = tomllib.loads(Path(argv[0]).read_text(encoding="utf-8"))
    print("\n".join(requirements(pyproject, argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

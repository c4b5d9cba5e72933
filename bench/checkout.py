"""`python -m bench.checkout CHECKOUT ARGS...`: run another checkout's `carousel ARGS...`.

An installed carousel maps its subpackages to folders (`carousel.service` is `service/`, and
so on: pyproject's package-dir), and an editable install does it with a finder on
`sys.meta_path` that answers for `carousel.*` before the path is searched. Putting the
checkout first on `sys.path` is therefore not enough: `carousel` would come from the
checkout and `carousel.service` still from this one. This puts a finder of the same mapping,
for the checkout's folders, ahead of every other, then runs the checkout's command line.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

SUBPACKAGES = {"carousel": "carousel", "carousel.service": "service",
               "carousel.export": "export", "carousel.model": "model",
               "carousel.bench": "bench"}


class CheckoutFinder:
    def __init__(self, root: Path) -> None:
        self.mapping = {name: root / folder for name, folder in SUBPACKAGES.items()}

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        folder = self.mapping.get(fullname)
        if folder is not None:
            return importlib.util.spec_from_file_location(
                fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])
        parent, _, _ = fullname.rpartition(".")
        if parent in self.mapping:
            return PathFinder.find_spec(fullname, [str(self.mapping[parent])])
        return None  # deeper modules: found through their parent's __path__


def main() -> int:
    root = Path(sys.argv[1]).resolve()
    if not (root / "carousel" / "__init__.py").exists():
        raise SystemExit(f"{root}: not a carousel checkout")
    sys.meta_path.insert(0, CheckoutFinder(root))
    sys.path.insert(0, str(root))  # its top-level `service`, `bench`, ... too
    sys.argv = ["carousel", *sys.argv[2:]]
    # Run as `-m carousel.bench.checkout`, this one's `carousel` is imported already.
    for name in [n for n in sys.modules if n == "carousel" or n.startswith("carousel.")]:
        del sys.modules[name]
    from carousel.service import server

    from carousel.cli import main as carousel_main

    if not Path(server.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"carousel.service came from {server.__file__}, not from {root}")
    return carousel_main()


if __name__ == "__main__":
    sys.exit(main())

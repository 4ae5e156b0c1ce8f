"""Loading a script of `scripts/` or `examples/` as a module (they are files run by path, not a
package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def load_script(name: str, folder: Path = SCRIPTS) -> ModuleType:
    """`scripts/<name>.py` (or `<folder>/<name>.py`), imported under `name`."""
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

"""The recipes' shared module, loaded from its file (recipes/ is not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def recipe_common():
    """recipes/common.py: the config loading both recipes share."""
    spec = importlib.util.spec_from_file_location("common", ROOT / "recipes" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""The recipes' shared module, loaded from its file (recipes/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def recipe_common():
    """recipes/common.py: the config loading both recipes share."""
    spec = importlib.util.spec_from_file_location("common", ROOT / "recipes" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe(name: str):
    """recipes/<name>.py as a module (its ``main(argv)`` runs it in this process)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module

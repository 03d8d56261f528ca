"""Every module's ``__all__`` names what it defines for callers: no name that does not exist, and no
public function or class of the module left out (``from module import *`` and the API docs read it)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import app

MODULES = sorted(m.name for m in pkgutil.walk_packages(app.__path__, "app.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_the_public_names_of_the_module(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    assert [n for n in exported if not hasattr(module, n)] == [], f"{name}.__all__ names what it lacks"
    defined = [n for n, v in vars(module).items()
               if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == name]
    assert [n for n in defined if n not in exported] == [], f"{name} defines public names left out of __all__"

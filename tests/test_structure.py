"""The house rules that keep the package easy to extend, checked on the code itself (issue 29):

* every method or property of ours that overrides one of a base class (Lightning's or our own) is marked
  ``@override``, and no class of ours has two bases (no mixins sharing ``self``);
* the core (everything but the front doors) imports no Lightning namespace and nothing of the adapter;
* private Lightning attributes are used only in ``lightning_dp/adapter/lightning_internals.py``.
"""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from lightning_dp.adapter import PUBLIC_NAMES

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_dp"
FRONT_DOORS = {"adapter", "lightning.py", "pytorch_lightning.py", "__init__.py", "fabric"}


def _ours(cls: type) -> bool:
    return cls.__module__.startswith("lightning_dp")


def _marked(value: object) -> bool:
    for candidate in (value, getattr(value, "__func__", None), getattr(value, "fget", None)):
        if candidate is not None and getattr(candidate, "__override__", False):
            return True
    return False


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_every_override_is_marked_and_no_class_of_ours_has_two_bases(namespace, name):
    import importlib

    module = importlib.import_module("lightning_dp." + namespace.split(".")[0])
    cls = getattr(module, name)
    mro = cls.__mro__
    unmarked = []
    for i, klass in enumerate(mro):
        if not _ours(klass):
            continue
        if len(klass.__bases__) != 1:
            unmarked.append(f"{klass.__qualname__} has bases {klass.__bases__} (a mixin)")
        for attr, value in vars(klass).items():
            if attr.startswith("__") or not (inspect.isfunction(value) or isinstance(value, (property, classmethod))):
                continue
            if any(attr in vars(base) for base in mro[i + 1:]) and not _marked(value):
                unmarked.append(f"{klass.__qualname__}.{attr}")
    assert not unmarked, f"{name} ({namespace}): overrides without @override or mixins: {unmarked}"


def _imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_core_imports_no_lightning_and_no_front_door():
    offending = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in FRONT_DOORS:
            continue
        bad = {name for name in _imports(path)
               if re.match(r"(lightning|pytorch_lightning)(\.|$)", name) or "adapter" in name or "fabric" in name}
        if bad:
            offending[str(relative)] = sorted(bad)
    assert not offending, f"core modules import a Lightning namespace or a front door: {offending}"


PRIVATE_LIGHTNING = re.compile(
    r"\b(trainer|module|lightning_module|strategy|callback)\._(results|trainer|val_check_time_interval)\b"
    r"|\bself\._(root_device|data_parallel_size|register_ddp_hooks|generate_state_key)\b"
    r"|\bdataset\._sampler\b|fit_loop\.epoch_loop\.batch_progress"
    r"|\"_(results|val_check_time_interval|sampler|register_ddp_hooks|root_device|data_parallel_size)\""
)


def test_private_lightning_attributes_are_used_in_one_module_only():
    uses = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "lightning_internals.py":
            continue
        found = [m.group(0) for m in PRIVATE_LIGHTNING.finditer(path.read_text())]
        if found:
            uses[str(path.relative_to(PACKAGE))] = found
    assert not uses, f"private Lightning attributes outside adapter/lightning_internals.py: {uses}"

"""Training recipes: one module per ``spec.method`` (``sft.py``, ``pretrain.py``, ``dpo.py``), each
defining ``RECIPE``, an instance of :class:`~kubetune_trainer.recipes.base.Recipe`.

    from kubetune_trainer import recipes
    recipe = recipes.get(job.spec.method)
    data = recipe.build_data(job, tokenizer, seed=42)

The registry is the package itself: every module here but ``base`` is a recipe, keyed by its
``RECIPE.method``, which must be a row of the core's table (``kubetune.methods.METHODS``). Adding a
method is one module here, one row there, its spec fields and an example job. Recipe modules import
torch, transformers and TRL inside their functions, so the registry loads fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from kubetune import methods as table
from kubetune_trainer.recipes.base import ModelHead, Recipe, TrainerSetup, arguments


@cache
def registry() -> dict[str, Recipe]:
    """Every recipe, by method name, in the table's order."""
    found: dict[str, Recipe] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        recipe = getattr(module, "RECIPE", None)
        if not isinstance(recipe, Recipe):
            raise TypeError(f"{module.__name__} defines no RECIPE (a kubetune_trainer.recipes.Recipe)")
        if recipe.method in found:
            raise TypeError(f"{module.__name__}: a second recipe for method {recipe.method}")
        table.method(recipe.method)  # KeyError: not in kubetune.methods.METHODS
        found[recipe.method] = recipe
    return dict(sorted(found.items(), key=lambda item: table.METHOD_NAMES.index(item[0])))


def get(method: str) -> Recipe:
    """The recipe of ``method`` (a spec.method value)."""
    try:
        return registry()[method]
    except KeyError:
        raise KeyError(f"no training recipe for method {method!r}; known: {', '.join(registry())}") from None


__all__ = ["ModelHead", "Recipe", "TrainerSetup", "arguments", "get", "registry"]

"""Distillation methods: one file each, holding the loss and its registered recipe.

Importing the package imports every module in it, so each ``@register``-ed method is available by its
``--distill`` name, and each module's public names (listed in its ``__all__``: the RepDistiller loss
classes such as ``DistillKL``, ``HintLoss``, ``CRDLoss``, and the adapters) are exported here.
"""

import importlib
import pkgutil

from common.errors import PairError

from .base import REGISTRY, Distiller, get_method, kd_term, method_names, register

__all__ = ["REGISTRY", "Distiller", "PairError", "get_method", "kd_term", "method_names", "register"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name == "base":
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", []):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)

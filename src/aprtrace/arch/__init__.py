"""One module per architecture family; ``architecture_of(config)`` picks it.

Adding an architecture: a module with an ``Architecture`` subclass (see ``llama.py``), its
rows in the stage graph (``aprtrace.stages``) for any new stage, its name mapping
(``aprtrace.mapping``), and one line in ``_MODULES`` below.
"""

from __future__ import annotations

from aprtrace.arch.base import Architecture, KVCache, PassContext
from aprtrace.errors import ModelLoadError

_MODULES: tuple[str, ...] = (
    "aprtrace.arch.llama",
    "aprtrace.arch.moe",
    "aprtrace.arch.gemma",
    "aprtrace.arch.phi3",
    "aprtrace.arch.olmo2",
    "aprtrace.arch.granite",
    "aprtrace.arch.stablelm",
    "aprtrace.arch.starcoder2",
)
_REGISTRY: dict[str, Architecture] = {}


def _load() -> dict[str, Architecture]:
    if not _REGISTRY:
        import importlib

        for module_name in _MODULES:
            module = importlib.import_module(module_name)
            for value in vars(module).values():
                if (
                    isinstance(value, type)
                    and issubclass(value, Architecture)
                    and value is not Architecture
                    and value.__module__ == module.__name__
                ):
                    instance = value()
                    for name in instance.names:
                        _REGISTRY[name] = instance
    return _REGISTRY


def architecture_of(config) -> Architecture:
    """The module computing ``config.architecture``."""
    registry = _load()
    try:
        return registry[config.architecture]
    except KeyError:
        raise ModelLoadError(
            f"no forward pass for architecture '{config.architecture}'",
            hint=f"supported: {', '.join(sorted(registry))}",
        ) from None


__all__ = ["Architecture", "KVCache", "PassContext", "architecture_of"]

"""Import of optional dependencies (package extras), shared by the modules that need them.

A leaf module: it imports nothing from facerec_tf but :mod:`facerec_tf.errors`, so any module
can use it without creating an import cycle.
"""

from __future__ import annotations

import importlib

from facerec_tf.errors import MissingDependencyError

__all__ = ["require"]


def require(modules: tuple[str, ...], what: str, extra: str = "onnx") -> list:
    """Import ``modules`` or raise :class:`MissingDependencyError` naming the extra.

    Args:
        modules: module names, imported in order.
        what: the feature that needs them, for the message ("ONNX export").
        extra: the package extra that installs them.

    Returns:
        the imported modules, in the order of ``modules``.
    """
    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as e:
            raise MissingDependencyError(
                f"{what} needs the optional package {name!r} ({e}); install the {extra!r} "
                f'extra: pip install -e ".[{extra}]" (tf2onnx, onnx, onnxruntime)'
            ) from e
    return loaded

"""An unpickler that resolves only an allow-list of globals: nothing named in a file is
imported or called unless the allow-list maps it to a function of this package. Shared by the
``.bin`` verification-set reader and the torch checkpoint reader."""

from __future__ import annotations

import _compat_pickle
import pickle
from typing import Any


class RefusedGlobal(Exception):
    """Raised by :meth:`AllowListUnpickler.find_class` (or by an allowed function refusing
    its arguments) for something outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


class AllowListUnpickler(pickle.Unpickler):
    """Resolves ``(module, name)`` only through :attr:`allowed`; anything else raises
    :class:`RefusedGlobal` before it is imported."""

    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles use Python 2 names (``__builtin__.eval``): map them to Python 3
        # names, as the default ``find_class`` does, before checking the allow-list (no
        # Python 2 name maps onto an allowed global, so this only makes messages readable).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

"""A layer folder imported under its own top-level name, handed over to the package of that name.

The layers sit at the top of a checkout (``kernels/``, ``engine/`` …) and are installed as
``livediff.kernels`` and so on. When the checkout is on ``sys.path`` (the current directory
of ``python -m`` and of pytest in the repository root), ``import kernels`` would find the
folder before the installed package of that name: Hugging Face's ``kernels``, which
transformers 5.25 and later import. A layer's ``__init__`` calls :func:`hand_over` when it is
imported as ``kernels`` rather than ``livediff.kernels``, and the import yields the installed
package instead, where one is installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    """Put the installed package ``name`` (found on ``sys.path`` without the checkout that holds
    ``init_file``, the layer's ``__init__.py``) in ``sys.modules[name]``, where the running
    import of the layer folder takes its result from. Without one the folder stays what the
    import yields, as before: libraries that probe for an optional ``kernels`` by importing it
    (transformers does, when no distribution of that name is installed) must not fail, and
    they find no version on it."""
    ours = os.path.realpath(init_file)
    checkout = os.path.dirname(os.path.dirname(ours))
    elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None or os.path.realpath(spec.origin or "") == ours:
        return  # nothing installed (or the checkout again, by another path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise

"""Old import path, kept for one release: use `dgate_export.compile.zoo`.

This module is `dgate_export.compile.zoo` itself (same objects, same registries), not a copy.
"""

import sys
import warnings

from .compile import zoo as _module

warnings.warn("dgate_export.zoo moved to dgate_export.compile.zoo; the old path goes in the next release.",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module

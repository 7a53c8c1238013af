"""Old import path, kept for one release: use `dgate_export.compile.build`.

This module is `dgate_export.compile.build` itself (same objects, same registries), not a copy.
"""

import sys
import warnings

from .compile import build as _module

warnings.warn("dgate_export.build moved to dgate_export.compile.build; the old path goes in the next release.",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module

"""Old import path, kept for one release: use `dgate_export.compile.checkpoint`.

This module is `dgate_export.compile.checkpoint` itself (same objects, same registries), not a copy.
"""

import sys
import warnings

from .compile import checkpoint as _module

warnings.warn("dgate_export.checkpoint moved to dgate_export.compile.checkpoint; the old path goes in the next release.",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module

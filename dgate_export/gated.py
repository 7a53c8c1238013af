"""Old import path, kept for one release: use `dgate_export.compile.model`.

This module is `dgate_export.compile.model` itself (same objects, same registries), not a copy.
"""

import sys
import warnings

from .compile import model as _module

warnings.warn("dgate_export.gated moved to dgate_export.compile.model; the old path goes in the next release.",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module

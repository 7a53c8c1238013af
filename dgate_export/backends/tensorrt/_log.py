"""A TensorRT logger that keeps the last warnings and errors, so failures can quote them.

Imports tensorrt at module level: import this module only after `available()` said TensorRT is here.
"""

from __future__ import annotations

import logging
from collections import deque

import tensorrt as trt

_log = logging.getLogger("dgate_export.tensorrt")


class CapturingLogger(trt.ILogger):
    """Forwards TensorRT's messages to Python logging and keeps the recent warnings and errors."""

    def __init__(self, keep: int = 20):
        trt.ILogger.__init__(self)
        self.messages: deque[str] = deque(maxlen=keep)

    def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
        if severity <= trt.ILogger.Severity.ERROR:
            _log.error("TensorRT: %s", msg)
            self.messages.append(msg)
        elif severity == trt.ILogger.Severity.WARNING:
            _log.warning("TensorRT: %s", msg)
            self.messages.append(msg)
        elif severity == trt.ILogger.Severity.INFO:
            _log.debug("TensorRT: %s", msg)

    def recent(self, count: int = 3) -> str:
        """The last `count` warnings/errors as one sentence, or "" when TensorRT said nothing."""
        last = list(self.messages)[-count:]
        return ("TensorRT said: " + " | ".join(m.strip() for m in last) + ".") if last else ""

    def clear(self) -> None:
        self.messages.clear()

"""Run a command and record its peak resident memory: `python benchmarks/peak_rss.py OUT.json CMD [ARGS...]`.

The peak is `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` of this small wrapper, whose only child is
the command. Measured from the caller directly (os.wait4 on its own child) it would not be the
command's own: Linux keeps the high-water mark of the process image before exec, so a child forked
from a large process (pytest, a script that imported torch) reports at least its parent's size. OUT.json
gets {"exit_status", "peak_rss_mb", "seconds"}; the command's output goes where this wrapper's goes.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()
    code = subprocess.call(cmd)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    with open(out, "w") as f:
        json.dump({"exit_status": code, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1)}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())

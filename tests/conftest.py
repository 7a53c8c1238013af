import os

import pytest
import torch

# Two cores here: keep torch from oversubscribing them when tests run ONNX Runtime beside it, and share
# them between pytest-xdist's workers (the README runs two: one torch thread each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

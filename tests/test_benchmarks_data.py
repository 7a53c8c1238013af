"""The committed benchmark weights load and still reach their recorded accuracy on Fashion-MNIST.

Cheap: 1000 test images per network. The recorded figures come from benchmarks/results.json (the full
10 000-image test split); a 1000-image subset differs from them by sampling noise only, so the bound
is the recorded accuracy minus 3 points (about 3 standard errors at 90%)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dgate_export import checkpoint
from dgate_export.data import DEFAULT_FMNIST_DIR, load_dataset
from dgate_export.zoo import build_backbone

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = json.loads((BENCH / "results.json").read_text()) if (BENCH / "results.json").is_file() else []
SUBSET = 1000

pytestmark = pytest.mark.skipif(not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def test_subset():
    return load_dataset("fashion-mnist", "test").subset(SUBSET, seed=0)


def test_every_network_is_recorded():
    assert {r["network"] for r in RESULTS} == {"resnet56", "densenet_bc"}


@pytest.mark.parametrize("row", RESULTS, ids=[r["network"] for r in RESULTS])
def test_committed_weights_reach_recorded_accuracy(row, test_subset):
    network = row["network"]
    gated = checkpoint.load(BENCH / "weights" / f"{network}_gated.pt")
    assert gated.arch == row["arch"]
    assert gated.exits == row["exits"]
    assert gated.thresholds == pytest.approx(row["thresholds"], abs=0)

    # The gates were trained without the validation rows the backbone was trained without.
    record = json.loads((BENCH / "weights" / f"{network}.json").read_text())
    assert gated.data_split == {"data": "fashion-mnist", "val_size": record["val_size"], "seed": record["seed"]}
    assert record["arch_kwargs"] == row["arch"]["kwargs"]

    # The plain backbone file is the gated model's backbone.
    backbone = build_backbone(network, row["arch"]["kwargs"])
    backbone.load_state_dict(torch.load(BENCH / "weights" / f"{network}.pth", weights_only=True))
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, gated.backbone.state_dict()[name]), name

    x, y = torch.from_numpy(test_subset.x), test_subset.y
    with torch.no_grad():
        ungated = backbone(x).argmax(1).numpy()
    out = gated.early_exit(x)
    acc_ungated = float((ungated == y).mean())
    acc_gated = float((out.logits.argmax(1).numpy() == y).mean())
    assert acc_ungated >= row["accuracy_ungated"] - 0.03
    assert acc_gated >= row["accuracy_gated"] - 0.03
    # Early exit really happens, at about the recorded rate: most samples leave before the end.
    fractions = np.bincount(out.exits.numpy(), minlength=gated.num_gates + 1) / len(y)
    assert fractions[-1] <= row["exit_fractions"][-1] + 0.05
    assert fractions[0] >= row["exit_fractions"][0] - 0.05

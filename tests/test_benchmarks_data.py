"""The committed benchmark weights load and reproduce their recorded figures on Fashion-MNIST exactly.

benchmarks/results.json records accuracy (gated and un-gated), exit fractions and expected FLOPs on the
full 10 000-image test split, computed by benchmarks/run.py as collect_exit_logits + evaluate; the
same computation here must give the same counts (a few seconds per network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dgate_export import checkpoint
from dgate_export.calibrate import evaluate
from dgate_export.confidence import confidence
from dgate_export.data import DEFAULT_FMNIST_DIR, load_dataset
from dgate_export.train import collect_exit_logits
from dgate_export.zoo import build_backbone

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = json.loads((BENCH / "results.json").read_text()) if (BENCH / "results.json").is_file() else []
pytestmark = pytest.mark.skipif(not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def test_split():
    return load_dataset("fashion-mnist", "test")


def test_every_network_is_recorded():
    assert {r["network"] for r in RESULTS} == {"resnet56", "densenet_bc"}


@pytest.mark.slow
@pytest.mark.parametrize("row", RESULTS, ids=[r["network"] for r in RESULTS])
def test_committed_weights_reproduce_the_recorded_figures(row, test_split):
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

    # The recorded test figures, reproduced exactly on all 10 000 test images.
    logits, y = collect_exit_logits(gated, test_split, progress=False)
    costs = gated.exit_costs()
    assert costs == pytest.approx(row["exit_costs"], rel=1e-12)
    figures = evaluate(logits, y, confidence=gated.confidence, thresholds=gated.thresholds, costs=costs,
                       baseline_flops=row["flops_baseline"])
    n = len(y)
    assert round(figures.accuracy_ungated * n) == round(row["accuracy_ungated"] * n)
    assert round(figures.accuracy * n) == round(row["accuracy_gated"] * n)
    assert [round(f * n) for f in figures.exit_fractions] == [round(f * n) for f in row["exit_fractions"]]
    assert figures.expected_flops == pytest.approx(row["flops_expected"], rel=1e-9)
    # The reference early-exit pass (real compaction) takes the same exits on a slice.
    x = torch.from_numpy(test_split.x[:512])
    out = gated.early_exit(x)
    conf = np.stack([confidence(gated.confidence, lg[:512]) for lg in logits[:-1]])
    leaves = [c >= np.float32(t) for t, c in zip(gated.thresholds, conf)] + [np.ones(512, bool)]
    first = np.argmax(np.stack(leaves), axis=0)  # the first exit whose gate lets the sample leave
    np.testing.assert_array_equal(out.exits.numpy(), first)

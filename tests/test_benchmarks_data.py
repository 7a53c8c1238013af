"""The committed benchmark weights load and reproduce their recorded figures on Fashion-MNIST exactly.

benchmarks/results.json records accuracy (gated and un-gated), exit fractions and expected FLOPs on the
full 10 000-image test split, computed by benchmarks/run.py as collect_exit_logits + evaluate; the
same computation here must give the same counts (a few seconds per network).

The paper's networks (torchvision's ResNet-101 and DenseNet-201, 32x32 inputs) are too slow for the
whole split on two cores: they run on a fixed 300-image subset of it whose figures run.py recorded
(`test_subset` in their rows), and must reproduce them exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dgate_export.calibrate import evaluate
from dgate_export.compile import checkpoint
from dgate_export.compile.train import collect_exit_logits
from dgate_export.compile.zoo import build_backbone
from dgate_export.confidence import confidence
from dgate_export.data import DEFAULT_FMNIST_DIR, load_dataset

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = json.loads((BENCH / "results.json").read_text()) if (BENCH / "results.json").is_file() else []
pytestmark = pytest.mark.skipif(not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def test_split():
    return load_dataset("fashion-mnist", "test")


PAPER = [r for r in RESULTS if r["arch"]["name"].startswith("torchvision/")]
ZOO = [r for r in RESULTS if r not in PAPER]


def test_every_network_is_recorded():
    assert {r["network"] for r in RESULTS} == {"resnet56", "densenet_bc", "resnet101", "densenet201"}
    assert {r["network"] for r in PAPER} == {"resnet101", "densenet201"}
    fields = set(RESULTS[0])
    for r in RESULTS:  # the same fields in every row (the paper's rows add their subset's figures)
        assert set(r) - {"test_subset"} == fields, r["network"]


@pytest.mark.slow
@pytest.mark.parametrize("row", PAPER, ids=[r["network"] for r in PAPER])
def test_paper_networks_reproduce_recorded_subset(row):
    network, subset = row["network"], row["test_subset"]
    gated = checkpoint.load(BENCH / "weights" / f"{network}_gated.pt")
    assert gated.arch == row["arch"] and gated.exits == row["exits"]
    assert gated.thresholds == pytest.approx(row["thresholds"], abs=0)
    record = json.loads((BENCH / "weights" / f"{network}.json").read_text())
    assert gated.data_split == {"data": subset["data"], "val_size": record["val_size"], "seed": record["seed"]}

    sys.path.insert(0, str(BENCH))
    from train_backbones import gate_rows, to_32

    # The gating data's test split: a seeded subset of Fashion-MNIST's, resized to 32x32.
    test = load_dataset("fashion-mnist", "test")
    test_rows = gate_rows(len(test), "test", record["seed"])
    rows = test_rows[np.random.default_rng(subset["seed"]).permutation(len(test_rows))[:subset["samples"]]]
    x, y = torch.from_numpy(to_32(test.x[rows]).repeat(3, axis=1)), test.y[rows]
    with torch.no_grad():
        ungated = gated.backbone(x).argmax(1).numpy()
    out = gated.early_exit(x)
    assert int((ungated == y).sum()) == subset["right_ungated"]
    assert int((out.logits.argmax(1).numpy() == y).sum()) == subset["right_gated"]
    assert np.bincount(out.exits.numpy(), minlength=gated.num_gates + 1).tolist() == subset["exit_counts"]


@pytest.mark.slow
@pytest.mark.parametrize("row", ZOO, ids=[r["network"] for r in ZOO])
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

"""Every torchvision classification builder through the factory contract and every method (issue 41).

Generated from torchvision's own registry (``torchvision.models.list_models``), as timm
generates its tests from its registry: a builder torchvision adds is tested without an
edit here. One tiny trial per builder, 3x32x32 synthetic images, one epoch of Adam, then
RTN W4A8, AdaRound W2A8, LSQ W4A8 and DKM W2 (every method; the other algorithms run on
the tiny ViT and Swin of tests/test_zoo.py), one step each. The grids use min/max ranges,
LSQ the paper's start and DKM one iteration: the MSE searches and the soft clustering
work on weight tensors whatever the model, and they would be most of the cost.

Builders up to :data:`SUITE_PARAMS` parameters (ImageNet head, from torchvision's own
metadata) run in ``make test``; the larger ones are marked ``zoo_large`` and run with
``make test-zoo`` (docs/zoo.md has the last run). What a builder needs from its user
(:data:`NEEDS`) and what cannot run at a small input (:data:`CANNOT`) are listed, and
docs/zoo.md must list the same.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torchvision import models

import r2sweep

#: Builders over this many parameters (torchvision's ImageNet count) are ``zoo_large``.
SUITE_PARAMS = 7_000_000
#: What a builder needs in ``model:`` to run through the contract, and why.
NEEDS = {
    "googlenet": ({"aux_logits": False, "init_weights": True},
                  "auxiliary heads return a tuple in training mode: aux_logits: false"),
    "inception_v3": ({"aux_logits": False, "init_weights": True},
                     "auxiliary heads return a tuple in training mode: aux_logits: false"),
    **{name: ({"image_size": 32}, "the position embedding is sized for image_size: set it to the input's")
       for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")},
}
#: Builders that cannot run on a 32x32 input, and why (they run on larger ones).
CANNOT = {
    "alexnet": "its pooling needs at least 63x63 inputs",
    "inception_v3": "its stem needs at least 75x75 inputs",
    "maxvit_t": "its block and grid partitions need inputs of 224x224",
}
DOWNSTREAM = [
    {"method": "ptq", "algorithm": "rtn", "weight_bits": [4], "range": "minmax"},
    {"method": "ptq", "algorithm": "adaround", "weight_bits": [2], "range": "minmax", "adaround_iters": 2,
     "calib_samples": 8},
    {"method": "qat", "algorithm": "lsq", "weight_bits": [4], "epochs": 1, "batch_size": 32, "start": "paper"},
    {"method": "dkm", "weight_bits": [2], "epochs": 1, "batch_size": 32, "dkm_iters": 1},
]


def _params(name: str) -> int:
    return next(iter(models.get_model_weights(name))).meta["num_params"]


def _builders() -> list:
    found = []
    for name in models.list_models(module=models):
        if name in CANNOT:
            continue
        marks = [pytest.mark.slow] + ([pytest.mark.zoo_large] if _params(name) > SUITE_PARAMS else [])
        found.append(pytest.param(name, marks=marks, id=name))
    return found


@pytest.mark.parametrize("builder", _builders())
def test_a_zoo_builder_goes_through_every_method_with_finite_results(builder: str) -> None:
    options, _ = NEEDS.get(builder, ({}, ""))
    metrics = r2sweep.run_trial({
        "data": {"name": "synthetic", "num_samples": 24, "num_classes": 4, "channels": 3, "input_size": 32},
        "model": {"factory": f"torchvision.models:{builder}", "num_classes": 4, **options},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.001},
        "proxy": {"result": "fp"},
        "downstream": DOWNSTREAM,
    })
    results = ["ptq_rtn_w4a8", "ptq_adaround_w2a8", "qat_lsq_w4a8", "dkm_w2"]
    assert not [name for name in results if metrics.get(f"{name}/diverged")], metrics
    assert all(math.isfinite(metrics[f"{name}/top1"]) and 0 <= metrics[f"{name}/top1"] <= 100 for name in results)


def test_the_docs_list_what_each_builder_needs_and_what_cannot_run() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "zoo.md").read_text()
    for name, (_, why) in NEEDS.items():
        assert f"`{name}`" in page and why in page, name
    for name, why in CANNOT.items():
        assert f"`{name}`" in page and why in page, name
    assert f"{SUITE_PARAMS // 1_000_000}M" in page

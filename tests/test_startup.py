"""What a process pays before it does anything: the CLI and a trial on digits never import torchvision or scikit-learn.

torchvision's import pulls in torch._dynamo (about 2.4 s here), paid by every CLI call and
every Ray worker that imports it. r2sweep imports it only where a torchvision model,
transform or dataset is built, so these checks fail if a module-level import comes back.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

IMPORTED = "import sys; {body}; print(sorted(m for m in sys.modules if m.split('.')[0] in {{'torchvision', 'sklearn'}}))"


def _modules_after(body: str) -> str:
    done = subprocess.run([sys.executable, "-c", IMPORTED.format(body=body)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_cli_and_the_whole_package_import_without_torchvision_or_sklearn() -> None:
    assert _modules_after("import r2sweep, r2sweep.cli.app, r2sweep.core.trial, r2sweep.core.models, "
                          "r2sweep.core.data") == "[]"


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2"])
def test_torchvision_is_imported_when_its_model_is_built(model: str) -> None:
    body = (f"from r2sweep.core.models import create_model; "
            f"create_model({model!r}, num_classes=10, in_channels=1, input_size=8, width=0.25)")
    assert "'torchvision'" in _modules_after(body)


def test_the_built_in_datasets_split_and_load_without_sklearn() -> None:
    # scikit-learn's import is about 2 s of CPU; the split is numpy's and digits is read
    # from the file scikit-learn ships (tests/test_data_split.py checks both against it).
    body = ("from r2sweep.core.data import create_data; "
            "[create_data(name, seed=0) for name in ('digits', 'synthetic')]; "
            "create_data('distorted_digits', seed=0, train_variants=1, val_variants=1, size=8)")
    assert _modules_after(body) == "[]"

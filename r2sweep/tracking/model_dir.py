"""An MLflow PyTorch model folder made around a trial's torch.export archive, without loading it.

``mlflow.pytorch.save_model`` takes a live ``nn.Module`` and exports it itself;
having one on the driver would mean building the user's model from what a run
names, which is code a tracking store must never make a reader run. The trial
exports its model where its code runs anyway (``pretrained.pt2``); here that
archive is copied, byte for byte, into the folder layout ``mlflow.pytorch``
loads (``data/model.pt2`` and an ``MLmodel`` declaring the ``pytorch`` flavor in
its ``pt2`` form, and ``python_function``), with a tensor signature made from the
shapes the trial recorded.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import torch
import yaml
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Schema, TensorSpec

__all__ = ["write_model_dir"]

_DATA = "data"
_ARCHIVE = "model.pt2"  # the name mlflow.pytorch looks for in data/ when there is no pickled model.pth


def write_model_dir(archive: str | os.PathLike[str], folder: str | os.PathLike[str], model: Model, *,
                    input_shape: Sequence[int], num_classes: int) -> None:
    """Fill ``folder`` (created) with the MLflow model of ``archive``; ``model`` carries the ids MLflow assigned."""
    folder = os.fspath(folder)
    os.makedirs(os.path.join(folder, _DATA))
    shutil.copyfile(archive, os.path.join(folder, _DATA, _ARCHIVE))
    float32 = np.dtype(np.float32)
    model.signature = ModelSignature(inputs=Schema([TensorSpec(float32, (-1, *[int(n) for n in input_shape]))]),
                                     outputs=Schema([TensorSpec(float32, (-1, int(num_classes)))]))
    model.add_flavor(mlflow.pytorch.FLAVOR_NAME, model_data=_DATA, pytorch_version=str(torch.__version__), code=None)
    requirements = mlflow.pytorch.get_default_pip_requirements()
    mlflow.pyfunc.add_to_model(model, loader_module="mlflow.pytorch", data=_DATA, code=None,
                               python_env="python_env.yaml", model_config={"device": None})
    with open(os.path.join(folder, "requirements.txt"), "w") as out:
        out.write("\n".join(requirements) + "\n")
    python = ".".join(map(str, sys.version_info[:3]))
    with open(os.path.join(folder, "python_env.yaml"), "w") as out:
        yaml.safe_dump({"python": python, "build_dependencies": ["pip"], "dependencies": ["-r requirements.txt"]}, out)
    model.save(os.path.join(folder, "MLmodel"))

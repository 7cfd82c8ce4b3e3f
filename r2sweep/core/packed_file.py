"""The packed artifact: one low-bit result as a single file a runtime can load, bit-identical to what was scored.

A zip archive (``<result>.r2q``):

* ``manifest.json``: the format and its version, what the file holds (the result,
  its widths, whatever the writer adds in ``about``), each member's SHA-256 and size,
  and each packed layer: its name, shape, width and grids (:mod:`r2sweep.core.quant.packing`);
* ``codes/<i>.bin`` and ``tables/<i>.bin``: each layer's bit-packed codes and, for a
  grid that is a table, its float32 values;
* ``float_state.pt``: every other tensor of the model (biases, BatchNorm, the
  activations' quantizer statistics), read back with ``weights_only=True``;
* ``graph.pt2``: the model's graph, a ``torch.export`` program, written with the packed
  layers' weights zeroed (they compress to nothing); the loader fills them in.

:func:`load_packed` checks every member against the manifest before reading any,
so a truncated or altered file is refused in one line naming the member.
Loading a graph runs the operations it names: load only files you made or trust,
as with any model file (docs/security.md).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from r2sweep.core.errors import R2SweepError
from r2sweep.core.quant.layers import QuantLayer, bake_weights, quant_layers
from r2sweep.core.quant.packing import Grid, PackedWeight, pack_weight, unpack_weight

__all__ = ["FORMAT", "VERSION", "PackedFileError", "write_packed", "load_packed", "PackedModel"]

FORMAT = "r2sweep-packed"
VERSION = 1
_MANIFEST = "manifest.json"
_GRAPH = "graph.pt2"
_FLOAT_STATE = "float_state.pt"


class PackedFileError(R2SweepError):
    """A packed file that is not one, is damaged, or is of a version this r2sweep does not read."""


@dataclass(frozen=True)
class PackedModel:
    """A loaded packed file: the runnable module and the manifest's ``about``."""

    module: nn.Module
    about: dict[str, Any]
    layers: dict[str, PackedWeight]


def _weight_key(name: str) -> str:
    return f"{name}.layer.weight"


def write_packed(quantized: nn.Module, widths: Callable[[QuantLayer], int], example: torch.Tensor,
                 path: str | os.PathLike[str], about: Mapping[str, Any] | None = None) -> Path:
    """Write ``quantized`` (a result with :class:`QuantLayer` s) as a packed file at ``path``; returns the path.

    ``example``: an input batch of two or more samples (the graph's batch dimension stays dynamic).

    Raises:
        PackedFileError: the model cannot be exported as a graph (``torch.export`` refused it).
    """
    baked = bake_weights(copy.deepcopy(quantized).cpu()).eval()
    layers = {name: pack_weight(layer.layer.weight, widths(layer)) for name, layer in quant_layers(baked)}
    state = baked.state_dict()
    float_state = {key: value for key, value in state.items() if key not in {_weight_key(n) for n in layers}}
    with torch.no_grad():
        for name in layers:
            baked.get_submodule(name).layer.weight.zero_()
    try:
        program = torch.export.export(baked, (example.cpu(),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as error:  # noqa: BLE001 - torch.export refuses models in many ways
        raise PackedFileError(f"the result's graph cannot be exported (torch.export: {type(error).__name__}: "
                              f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''})") from None
    members: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as scratch:
        torch.export.save(program, Path(scratch) / _GRAPH)
        members[_GRAPH] = (Path(scratch) / _GRAPH).read_bytes()
    buffer = io.BytesIO()
    torch.save(float_state, buffer)
    members[_FLOAT_STATE] = buffer.getvalue()
    described = []
    for index, (name, packed) in enumerate(layers.items()):
        members[f"codes/{index}.bin"] = packed.codes
        grids = []
        for number, grid in enumerate(packed.grids):
            if grid.table is None:
                grids.append({"step": grid.step, "offset": grid.offset})
            else:
                member = f"tables/{index}-{number}.bin"
                members[member] = grid.table.astype("<f4").tobytes()
                grids.append({"table": member, "size": int(grid.table.size)})
        described.append({"name": name, "shape": list(packed.shape), "width": packed.width,
                          "codes": f"codes/{index}.bin", "grids": grids})
    manifest = {"format": FORMAT, "version": VERSION, "about": dict(about or {}), "layers": described,
                "members": {member: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                            for member, data in members.items()}}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".partial.{target.name}")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(_MANIFEST, json.dumps(manifest, indent=1, default=str))
        for member, data in members.items():
            archive.writestr(member, data)
    os.replace(partial, target)
    return target


def _read(archive: zipfile.ZipFile, manifest: Mapping[str, Any], member: str, path: Path) -> bytes:
    expected = manifest["members"].get(member)
    try:
        data = archive.read(member)
    except (KeyError, zipfile.BadZipFile, OSError) as error:
        raise PackedFileError(f"{path}: its member {member} cannot be read ({error}); export the result again") from None
    if expected is None or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise PackedFileError(f"{path}: its member {member} does not match the manifest (damaged or altered); "
                              "export the result again")
    return data


def load_packed(path: str | os.PathLike[str]) -> PackedModel:
    """The packed file at ``path`` as a runnable module, its weights bit-identical to those packed.

    Raises:
        PackedFileError: not a packed file, a damaged or altered member, or another format version.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise PackedFileError(f"{path}: not an r2sweep packed file ({error})") from None
    with archive:
        try:
            manifest = json.loads(archive.read(_MANIFEST))
        except (KeyError, ValueError, zipfile.BadZipFile) as error:
            raise PackedFileError(f"{path}: no readable {_MANIFEST} ({error}); not an r2sweep packed file") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise PackedFileError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                                  f"this r2sweep reads {FORMAT!r} version {VERSION}")
        data = {member: _read(archive, manifest, member, path) for member in manifest["members"]}
    layers = {}
    for entry in manifest["layers"]:
        grids = tuple(Grid(table=np.frombuffer(data[g["table"]], dtype="<f4").astype(np.float32)) if "table" in g
                      else Grid(step=float(g["step"]), offset=float(g["offset"])) for g in entry["grids"])
        layers[entry["name"]] = PackedWeight(tuple(entry["shape"]), int(entry["width"]), data[entry["codes"]], grids)
    module = torch.export.load(io.BytesIO(data[_GRAPH])).module()
    state = torch.load(io.BytesIO(data[_FLOAT_STATE]), map_location="cpu", weights_only=True)
    state.update({_weight_key(name): unpack_weight(packed) for name, packed in layers.items()})
    module.load_state_dict(state, strict=True)
    return PackedModel(module, dict(manifest.get("about", {})), layers)

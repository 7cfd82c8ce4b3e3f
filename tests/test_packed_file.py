"""The packed artifact (r2sweep.core.packed_file): a real result written, loaded, and scored the same."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from r2sweep.core.data import create_data
from r2sweep.core.models import create_model
from r2sweep.core.packed_file import PackedFileError, load_packed, write_packed
from r2sweep.core.quant.layers import layer_bits, quant_layers
from r2sweep.core.quant.methods import DOWNSTREAM_METHODS, DownstreamContext, load_downstream

CPU = torch.device("cpu")
FAST = {"ptq": {"algorithm": "rtn", "calib_samples": 32}, "dkm": {"epochs": 1, "batch_size": 32}}


def _result(method: str, bits: int):
    torch.manual_seed(0)
    data = create_data("synthetic", seed=0, num_samples=64)
    model = create_model("small_cnn", num_classes=data.num_classes, in_channels=data.in_channels,
                         input_size=data.input_size, width=0.25).eval()
    (entry,) = load_downstream([{"method": method, "weight_bits": [bits], **FAST[method]}])
    quantized = DOWNSTREAM_METHODS.get(method).quantize(model, entry, bits, DownstreamContext(data, 0, CPU, 32))
    keep = entry.rounding().keep_first_last_bits
    images = torch.stack([data.val[i][0] for i in range(len(data.val))])
    return quantized, (lambda layer: layer_bits(layer.first_or_last, bits, keep)), images


@pytest.mark.parametrize(("method", "bits"), [("ptq", 4), ("ptq", 2), ("dkm", 2)])
def test_a_packed_result_loads_bit_identical_and_scores_the_same(tmp_path: Path, method: str, bits: int) -> None:
    quantized, widths, images = _result(method, bits)
    path = write_packed(quantized, widths, images[:2], tmp_path / "result.r2q", about={"result": f"{method}_w{bits}"})
    loaded = load_packed(path)
    assert loaded.about == {"result": f"{method}_w{bits}"}
    for name, layer in quant_layers(quantized):
        assert torch.equal(loaded.module.get_submodule(name).layer.weight, layer.quantized_weight().detach()), name
        assert loaded.layers[name].width == widths(layer)
    with torch.no_grad():
        assert torch.equal(loaded.module(images), quantized(images))  # the same outputs, not merely the same top-1
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        # The graph carries no weights of its own: zeroed, they compress away.
        graph = archive.getinfo("graph.pt2")
        assert graph.compress_size < graph.file_size / 2
    assert manifest["format"] == "r2sweep-packed" and len(manifest["layers"]) == len(quant_layers(quantized))


def test_a_damaged_or_foreign_file_is_refused_in_one_line(tmp_path: Path) -> None:
    quantized, widths, images = _result("ptq", 4)
    path = write_packed(quantized, widths, images[:2], tmp_path / "result.r2q")
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    codes = bytearray(members["codes/1.bin"])
    codes[0] ^= 0xFF
    damaged = tmp_path / "damaged.r2q"
    with zipfile.ZipFile(damaged, "w") as archive:
        for name, data in {**members, "codes/1.bin": bytes(codes)}.items():
            archive.writestr(name, data)
    with pytest.raises(PackedFileError, match=r"member codes/1\.bin does not match the manifest") as refused:
        load_packed(damaged)
    assert "\n" not in str(refused.value)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(PackedFileError, match="not an r2sweep packed file"):
        load_packed(tmp_path / "notes.txt")
    manifest = json.loads(members["manifest.json"])
    newer = tmp_path / "newer.r2q"
    with zipfile.ZipFile(newer, "w") as archive:
        for name, data in {**members, "manifest.json": json.dumps({**manifest, "version": 99}).encode()}.items():
            archive.writestr(name, data)
    with pytest.raises(PackedFileError, match="version 99; this r2sweep reads 'r2sweep-packed' version 1"):
        load_packed(newer)

"""Networks from torchvision's zoo through the factory contract and every downstream method.

Attention modules read their projections' weights instead of calling them
(``nn.MultiheadAttention`` passes ``out_proj.weight`` to its functional form; Swin's
window attention does the same with ``qkv`` and ``proj``): a quantized layer must
still answer ``.weight``, and a layer-wise reconstruction must not need that
layer's inputs. A model with auxiliary heads (googlenet) returns more than logits
in training mode: refused before training, naming the option. Tiny sizes on
synthetic 3-channel images: seconds each. Every builder of the zoo, through every
method: tests/test_zoo_generated.py.
"""

from __future__ import annotations

import math

import pytest

import r2sweep

DOWNSTREAM = [
    {"method": "ptq", "algorithm": "rtn", "weight_bits": [4]},
    {"method": "ptq", "algorithm": "adaround", "weight_bits": [2], "adaround_iters": 5, "calib_samples": 16},
    {"method": "ptq", "algorithm": "brecq", "weight_bits": [2], "adaround_iters": 5, "calib_samples": 16},
    {"method": "ptq", "algorithm": "qdrop", "weight_bits": [2], "adaround_iters": 5, "calib_samples": 16},
    {"method": "qat", "algorithm": "lsq", "weight_bits": [4], "epochs": 1},
    {"method": "qat", "algorithm": "lsqplus", "weight_bits": [4], "epochs": 1},
    {"method": "qat", "algorithm": "ewgs", "weight_bits": [4], "epochs": 1},
    {"method": "dkm", "weight_bits": [2], "epochs": 1},
]
MODELS = {
    "vit": {"factory": "torchvision.models.vision_transformer:VisionTransformer", "image_size": 8, "patch_size": 4,
            "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32},
    "swin": {"factory": "torchvision.models.swin_transformer:SwinTransformer", "patch_size": [2, 2], "embed_dim": 8,
             "depths": [1, 1], "num_heads": [1, 2], "window_size": [2, 2], "stochastic_depth_prob": 0.0},
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_zoo_transformer_goes_through_every_method_with_finite_results(model: str) -> None:
    metrics = r2sweep.run_trial({
        "data": {"name": "synthetic", "num_samples": 64, "channels": 3, "input_size": 8},
        "model": MODELS[model],
        "train": {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.001},
        "r2": {"kind": "linf", "strength": 0.01},
        "downstream": DOWNSTREAM,
    })
    results = [key for key in metrics if key.endswith("/top1") and key not in ("fp/top1", "proxy/top1")]
    assert len(results) == len(DOWNSTREAM) and not [k for k in metrics if k.endswith("/diverged")]
    assert all(math.isfinite(metrics[key]) and 0 <= metrics[key] <= 100 for key in results), metrics
    if model == "vit":  # what stays float is said, not hidden
        assert "in_proj_weight" in metrics["notes"] and "stay float" in metrics["notes"]


def test_a_model_with_auxiliary_heads_is_refused_before_training_naming_the_option(tmp_path) -> None:
    from r2sweep.core.errors import ConfigError

    trial = {"data": {"name": "synthetic", "num_samples": 64, "channels": 3, "input_size": 32},
             "model": {"factory": "torchvision.models:googlenet", "num_classes": 10, "init_weights": True},
             "train": {"epochs": 1, "batch_size": 32}}
    with pytest.raises(ConfigError, match=r"model\.factory=.*in training mode it returned GoogLeNetOutputs.*aux_logits: false"):
        r2sweep.run_trial(trial, out_dir=tmp_path / "refused")
    assert not (tmp_path / "refused" / "config.yaml").exists()  # refused before anything is written
    metrics = r2sweep.run_trial({**trial, "model": {**trial["model"], "aux_logits": False}})
    assert 0 <= metrics["fp/top1"] <= 100


def test_a_net_that_pools_to_one_pixel_before_batchnorm_trains_when_the_split_leaves_one_sample() -> None:
    from r2sweep.core.build import build_trial_data
    from r2sweep.core.config.trial import load_trial_config
    from r2sweep.core.data import make_loader

    trial = {"data": {"name": "synthetic", "num_samples": 48, "num_classes": 4, "channels": 3, "input_size": 32},
             "model": {"factory": "torchvision.models:shufflenet_v2_x0_5", "num_classes": 4},
             "downstream": [{"method": "qat", "algorithm": "lsq", "weight_bits": [4], "epochs": 1}]}
    train = build_trial_data(load_trial_config(trial)).train
    batch = len(train) - 1  # the epoch would end on a batch of one sample
    assert [len(y) for _, y in make_loader(train, batch, shuffle=True, seed=0)] == [batch]
    assert [len(y) for _, y in make_loader(train, batch, shuffle=False, seed=0)] == [batch, 1]  # evaluation sees all
    metrics = r2sweep.run_trial({**trial, "train": {"epochs": 1, "batch_size": batch},
                                 "downstream": [{**trial["downstream"][0], "batch_size": batch}]})
    assert 0 <= metrics["qat_lsq_w4a8/top1"] <= 100


def test_a_model_that_reads_its_state_version_loads_from_the_pretraining_cache(tmp_path) -> None:
    # torchvision's MNASNet refuses a state without the version its metadata carries;
    # the cache's copy of the weights used to drop it, and the second trial died on the hit.
    from r2sweep.core.config.trial import load_trial_config
    from r2sweep.core.pretrain_cache import PretrainCache
    from r2sweep.core.trial import run_trial

    config = load_trial_config({
        "data": {"name": "synthetic", "num_samples": 32, "num_classes": 4, "channels": 3, "input_size": 16},
        "model": {"factory": "torchvision.models:mnasnet0_5", "num_classes": 4},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.001}, "proxy": {"result": "fp"},
        "downstream": [{"method": "qat", "algorithm": "lsq", "weight_bits": [4], "epochs": 1, "batch_size": 16}],
    })
    cache = PretrainCache(tmp_path / "cache")
    first = run_trial(config, cache=cache, cache_label="first")
    second = run_trial(config, cache=cache, cache_label="second")
    assert (first["pretrain_cache"], second["pretrain_cache"]) == ("stored", "hit")
    assert second["fp/top1"] == first["fp/top1"] and second["qat_lsq_w4a8/top1"] == first["qat_lsq_w4a8/top1"]


def test_a_state_saved_without_its_metadata_still_loads_into_a_model_that_reads_it(tmp_path) -> None:
    # An entry stored before the cache kept the metadata, or any plain dict of tensors.
    import torch
    import torchvision

    from r2sweep.core.checkpoint import load_state

    source = torchvision.models.mnasnet0_5(num_classes=4)
    plain = {name: tensor.clone() for name, tensor in source.state_dict().items()}
    target = torchvision.models.mnasnet0_5(num_classes=4)
    load_state(target, plain)
    assert all(torch.equal(plain[name], tensor) for name, tensor in target.state_dict().items())

"""One trial end to end: data -> model -> pre-train with R2 -> every downstream result.

The unit a sweep runs, and what ``r2sweep trial FILE`` runs alone. It knows
nothing of Ray, Optuna or MLflow: it reports through a plain callback, called

* after every pre-training epoch with that epoch's metrics plus ``proxy/top1``
  (round-to-nearest accuracy on one downstream result's grid, that result's
  entry at its weight bit width: ``TrialConfig.proxy_target``; cheap enough to
  rank trials early), and
* once at the end with every final metric (``fp/top1``, one ``<result>/top1``
  per downstream result, each result's ``/size_bytes`` and ``/size_ratio`` and the
  float model's ``fp/size_bytes`` (:mod:`r2sweep.core.quant.size`), the pre-trained
  weight statistics, the seconds each phase took); that call has ``final = 1`` (not ``done``: Ray Tune reserves it),
  and the text values of :data:`TEXT_RESULTS` (how the pre-trained weights came,
  and any notes), which the sweep turns into tags of the trial's MLflow run.

The pre-trained weights are computed once; each downstream result starts from
its own copy of them, so results never contaminate each other.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from r2sweep.core.checkpoint import load_checkpoint, save_atomic
from r2sweep.core.config.trial import TrialConfig
from r2sweep.core.build import build_trial_data, build_trial_model, check_output, model_field
from r2sweep.core.environment import resolve_inputs
from r2sweep.core.data import make_loader
from r2sweep.core.data_parallel import LocalPeers, Peers, seed_everything, train_loader
from r2sweep.core.errors import ConfigError, TrialDiverged
from r2sweep.core.plots import weight_histograms
from r2sweep.core.precision import check_precision
from r2sweep.core.pretrain_cache import PretrainCache
from r2sweep.core.pretrained_file import MODEL_ARCHIVE, PRETRAINED, export_archive, save_pretrained
from r2sweep.core.pretraining import HIT, MISS, OFF, PretrainJob, run_pretraining
from r2sweep.core.graph import graph_notes
from r2sweep.core.quant.layers import bake_weights, layer_bits
from r2sweep.core.quant.methods import DOWNSTREAM_METHODS, DownstreamContext
from r2sweep.core.quant.ptq import round_to_nearest
from r2sweep.core.quant.size import fp32_bytes, model_size
from r2sweep.core.stats import weight_stats
from r2sweep.core.train import evaluate, resolve_device

__all__ = ["TEXT_RESULTS", "run_trial", "check_out_dir", "config_fingerprint", "Reporter", "Progress", "PRETRAIN_CHECKPOINT", "PRETRAINED",
           "MODEL_ARCHIVE", "HISTOGRAMS", "TRIAL_FILES"]

#: Receives a flat ``{metric: number}`` dict; see the module docstring.
Reporter = Callable[[dict[str, Any]], None]
#: Receives one human-readable line per phase (the CLI prints them).
Progress = Callable[[str], None]

#: The reports' text values: ``notes`` (see :func:`run_trial`), and how the pre-trained
#: weights came (``pretrain_cache``, in every report: per epoch off, miss (training) or
#: hit (replayed); at the end off, stored, hit or uncacheable; the cache entry's
#: ``pretrain_key`` and ``pretrain_source``, the trial that trained them, at the end).
TEXT_RESULTS = ("notes", "pretrain_cache", "pretrain_key", "pretrain_source")

PRETRAIN_CHECKPOINT = "pretrain_state.pt"
#: Weight histograms of the pre-trained model's worst-outlier layers.
HISTOGRAMS = "weights.png"
#: What a trial leaves for its tracked run: the weights as data, the exported model, the figure.
TRIAL_FILES = (PRETRAINED, MODEL_ARCHIVE, HISTOGRAMS)
# Evaluation batches are large: no gradients, and fewer Python round-trips.
_EVAL_BATCH = 256


def config_fingerprint(config: TrialConfig) -> str:
    """A digest of the whole trial config: what a pre-training checkpoint belongs to."""
    return hashlib.sha256(json.dumps(config.to_mapping(), sort_keys=True, default=str).encode()).hexdigest()


def check_out_dir(config: TrialConfig, out_dir: str | Path) -> None:
    """Fail before anything is written if ``out_dir`` holds another config's pre-training state.

    Raises:
        ConfigError: the checkpoint there was written by a different trial config.
    """
    checkpoint = Path(out_dir) / PRETRAIN_CHECKPOINT
    if checkpoint.is_file():
        owner = load_checkpoint(checkpoint).get("owner")
        if owner is not None and owner != config_fingerprint(config):
            raise ConfigError("out_dir", str(out_dir), f"its {PRETRAIN_CHECKPOINT} holds the pre-training state of a "
                              "different trial config; use another output folder (--out) or delete it to start over")


def run_trial(
    config: TrialConfig,
    report: Reporter | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
    device: torch.device | None = None,
    cache: PretrainCache | None = None,
    cache_label: str = "",
    peers: Peers | None = None,
) -> dict[str, Any]:
    """Run one trial and return its final metrics (the dict of the last report).

    Args:
        config: a validated :class:`TrialConfig`.
        report: see the module docstring.
        out_dir: where checkpoints go: the pre-training state (a rerun resumes
            from it), ``pretrained.pt`` and one ``<result>.pt`` per downstream
            result (weights with the quantized values baked in). None: nothing
            is written.
        progress: receives one line per phase.
        device: defaults to ``config.train.device`` (a GPU when present).
        cache: the pre-training cache to take the pre-trained weights from, or store
            them in (:mod:`r2sweep.core.pretraining`); None trains without one.
        cache_label: names this trial in an entry it stores (e.g. ``sweep/trial_id``).
        peers: who runs ranks 1..N-1 of a data-parallel pre-training (``train.workers`` > 1;
            :mod:`r2sweep.core.data_parallel`); default: processes on this machine.

    A downstream fine-tuning that diverges is reported as ``<result>/diverged = 1``
    without a ``<result>/top1``; the other results still run. When a note was
    logged (a non-strict ``init_from`` left tensors as initialised; a model
    torch.fx cannot trace was quantized by its module order), the final report
    also carries ``notes``, their text.

    Raises:
        TrialDiverged: pre-training produced a non-finite loss.
    """
    report = report or (lambda metrics: None)
    progress = progress or (lambda line: None)
    resolve_inputs(config)  # a config loaded from text names its code; import it here, where it runs
    device = device or resolve_device(config.train.device)
    check_precision(config.train.precision, device)  # fp16 off a GPU: refused before anything is built
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    seed_everything(config.seed)
    data = build_trial_data(config)
    # The checkpoint is loaded before R2 is built: its learnable margins and
    # temperatures start from the loaded weights' ranges, not a random init's.
    model, notes = build_trial_model(config, data)
    check_output(model, data, model_field(config), config.model.reference)
    notes += graph_notes(model)
    for note in notes:
        progress(f"note: {note}")
    r2 = config.r2.build(model)
    for note in r2.notes(device):
        notes.append(note)
        progress(f"note: {note}")
    loader = train_loader(config, data.train, device)
    val_loader = make_loader(data.val, _EVAL_BATCH, shuffle=False, seed=config.seed)

    # One entry's grid at one bit width (TrialConfig.proxy_target), never a mix of
    # two entries: a mixed proxy can sit at chance for every trial and blind ASHA.
    proxy = config.proxy_target() if config.downstream else None

    def measure(metrics: dict[str, Any]) -> None:
        if config.downstream:
            if proxy is None:
                metrics["proxy/top1"] = metrics["val/top1"]
            else:
                metrics["proxy/top1"] = evaluate(round_to_nearest(model, *proxy), val_loader, device)

    def emit(metrics: dict[str, Any], replayed: bool) -> None:
        shown = "" if "proxy/top1" not in metrics or proxy is None else f", W{proxy[1]} RTN {metrics['proxy/top1']:.1f}%"
        progress(
            f"pre-train epoch {int(metrics['epoch']) + 1}/{config.train.epochs}: loss {metrics['train/loss']:.3f}, "
            f"val {metrics['val/top1']:.1f}%" + shown + (" (from the pre-training cache)" if replayed else "")
        )
        # Every epoch says how its weights came, so a trial the scheduler stops early is tagged too.
        report({**metrics, "pretrain_cache": HIT if replayed else (MISS if cache is not None else OFF)})

    ranks = f" over {config.train.workers} data-parallel ranks" if config.train.workers > 1 else ""
    progress(f"pre-training {config.model.reference} on {config.data.reference} with R2 {config.r2.kind} for "
             f"{config.train.epochs} epochs{ranks}")
    checkpoint = out / PRETRAIN_CHECKPOINT if out is not None else None
    # The checkpoint carries the config's fingerprint: a folder reused for another
    # config is refused instead of silently resumed (the sweep gives each trial its own).
    if out is not None:
        check_out_dir(config, out)
    if config.train.workers > 1 and peers is None:
        peers = LocalPeers(config, threads=torch.get_num_threads(), device=device)
    job = PretrainJob(config, model, r2, loader, val_loader, device, measure, emit, checkpoint,
                      config_fingerprint(config), started, peers)
    done = run_pretraining(job, cache, cache_label)
    # Stale gradients of the last step would ride along into every downstream copy; a
    # model served from the cache has none, and the two must be the same model.
    model.zero_grad(set_to_none=True)
    if done.note:
        notes.append(done.note)
        progress(f"note: {done.note}")
    if done.cache == HIT:
        progress(f"pre-trained weights from the cache (entry {done.key[:12]}, trained by {done.source or 'an earlier trial'}; "
                 f"{done.saved_s:.1f}s saved)")
    last_proxy = {k: v for k, v in done.history[-1].items() if k == "proxy/top1"} if done.history else {}
    final: dict[str, Any] = {"time/pretrain_s": time.perf_counter() - started, "pretrain_cache": done.cache}
    if done.cache == HIT:
        final["time/pretrain_saved_s"] = done.saved_s
    if done.key:
        final.update(pretrain_key=done.key, pretrain_source=done.source)
    final.update({f"comm/{name}": value for name, value in job.comm.items()})
    if done.resumed:  # this attempt took its first epochs from the trial's own checkpoint (a restart after a failure)
        final["pretrain/resumed_epochs"] = done.resumed
    model.eval()
    final["fp/top1"] = evaluate(model, val_loader, device)
    final["fp/size_bytes"] = fp32_bytes(model)
    final.update(weight_stats(model))
    # The scheduler compares trials on the proxy at every report, the final one included.
    final.update(last_proxy)
    if out is not None:
        # Tensors and plain data only: whoever reads them (a report, the champion's registration)
        # runs none of the model's code.
        sample = data.train[0][0]
        save_pretrained(model, list(sample.shape), data.num_classes, out / PRETRAINED)
        weight_histograms(model.cpu(), out / HISTOGRAMS, title=f"pre-trained weights, R2 {config.r2.kind}")
        # Two samples: torch.export specializes a dimension whose example size is 1.
        why = export_archive(model, torch.stack([sample, data.train[1][0]]), out / MODEL_ARCHIVE)
        if why is not None:
            notes.append(f"no {MODEL_ARCHIVE} (the champion's format): torch.export could not trace the model: {why}")
            progress(f"note: {notes[-1]}")
        model.to(device)

    context = DownstreamContext(data, config.seed, device, config.train.batch_size, config.train.num_workers, progress,
                                precision=config.train.precision, train_optimizer=config.train.optimizer,
                                train_lr=config.train.lr, score=lambda candidate: evaluate(candidate, val_loader, device))
    for entry in config.downstream:
        quantize = DOWNSTREAM_METHODS.get(entry.method).quantize
        for bits in entry.weight_bits:
            name = entry.result_name(bits)
            progress(f"{name}: {entry.method} {entry.algorithm} at {bits}-bit weights")
            phase_start = time.perf_counter()
            try:
                quantized = quantize(model, entry, bits, context)
            except TrialDiverged as error:
                # One recipe failing must not discard the pre-training and the
                # other results: this result is marked and left out.
                final[f"{name}/diverged"] = 1
                progress(f"{name}: diverged ({error})")
                continue
            final[f"{name}/top1"] = evaluate(quantized, val_loader, device)
            keep = entry.rounding().keep_first_last_bits
            size = model_size(quantized, reference=model,
                              widths=lambda layer: layer_bits(layer.first_or_last, bits, keep))
            final[f"{name}/size_bytes"], final[f"{name}/size_ratio"] = size.total, size.ratio
            final.update({f"{name}/{fact}": value for fact, value in context.facts.pop(name, {}).items()})
            final[f"time/{name}_s"] = time.perf_counter() - phase_start
            progress(f"{name}: top-1 {final[f'{name}/top1']:.2f}% ({final[f'time/{name}_s']:.1f}s)")
            if out is not None:
                save_atomic({"model": bake_weights(quantized).state_dict()}, out / f"{name}.pt")

    notes += context.notes
    final["time/total_s"] = time.perf_counter() - started
    final["final"] = 1
    if notes:
        final["notes"] = "; ".join(notes)  # text, not a metric: the sweep tags the trial's run with it
    report(dict(final))
    return final


def summarize(metrics: dict[str, Any], config: TrialConfig) -> list[str]:
    """The ``/top1`` lines a person reads at the end of a trial, FP first."""
    return [f"{key:<28} {metrics[key]:6.2f}" for key in config.metric_names() if key in metrics]

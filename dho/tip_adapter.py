"""Tip-Adapter-F (Zhang et al., ECCV 2022), the few-shot teacher of DHO-F, built from teacher caches.

    dho tip-adapter --labeled LAB --labeled-cache LAB.zarr --val VAL --val-cache VAL.zarr --out TEACHER.pt
    dho tip-adapter-cache TEACHER.pt --dataset DS --cache DS.zarr --out DS-tipf.zarr

The teacher's image tower never runs again: everything comes from the embeddings the caches
store (`dho precompute-teacher --store-embeddings`). With f the L2-normalised image embedding,
W the base teacher's zero-shot classifier (the cache's `text_classifier`) and 1/zeta its logit scale:

    logits(f) = f W^T / zeta + alpha * exp(-beta * (1 - f K^T)) V        (Tip-Adapter, Eq. 6)

- keys K (N_l, D): per labeled image, the mean of its normalised embeddings over the cached
  augmented views, re-normalised (Tip-Adapter averages 10 augmented epochs);
- values V (N_l, C): the one-hot labels;
- Tip-Adapter-F fine-tunes K with AdamW (lr 1e-3, eps 1e-4), a cosine schedule, cross-entropy of
  the logits above on every cached (labeled image, view), for 20 epochs at alpha = beta = 1, keeping
  the epoch best on the validation split;
- alpha and beta are then searched on the validation split over Tip-Adapter's grid: beta in 200
  steps from 0.1 to 7, alpha in 20 steps from 0.1 to 3.

`apply` writes a teacher cache for any dataset whose cache holds embeddings: the same views,
boxes, keys and validity, with p = softmax(logits / eta) at the base cache's eta, so `dho distill`
reads it like any other cache. Its `teacher` attribute names Tip-Adapter-F, the base model and the
labeled set (fingerprint) it was fitted on; its weights checksum is the adapter file's.

Out of scope: Tip-Adapter without fine-tuning as a separate teacher (alpha/beta search on the
training-free keys is what the first step measures and prints), other adapters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dho
from dho import data
from dho.atomic import write_atomic
from dho.cache import TeacherCache
from dho.devices import resolve_device
from dho.errors import CacheError, ConfigError, check_number

FORMAT = "dho-tip-adapter-f"
BETA_GRID = tuple(0.1 + i * (7.0 - 0.1) / 200 for i in range(200))  # Tip-Adapter's search: scale 7, 200 steps
ALPHA_GRID = tuple(0.1 + i * (3.0 - 0.1) / 20 for i in range(20))  # scale 3, 20 steps


def tip_logits(f: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, classifier: torch.Tensor, zeta: float,
               alpha: float, beta: float) -> torch.Tensor:
    """(B, D) normalised embeddings -> (B, C) Tip-Adapter logits (Eq. 6 of Tip-Adapter)."""
    zero_shot = f @ classifier.T / zeta  # (B, C)
    affinity = f @ keys.T  # (B, N_l)
    return zero_shot + alpha * torch.exp(-beta * (1.0 - affinity)) @ values  # (B, C)


def _embeddings(cache: TeacherCache, views: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """-> (V', N, D) normalised embeddings of the given views, (N,) valid mask."""
    if not cache.has_embeddings:
        raise CacheError(f"{cache.path} holds no teacher embeddings; Tip-Adapter needs them: rebuild it with "
                         "`dho precompute-teacher --store-embeddings`")
    if not cache.is_complete():
        raise CacheError(f"{cache.path} is incomplete; finish it with the same `dho precompute-teacher` command")
    emb = np.stack([cache.embeddings(v, 0, cache.num_samples) for v in views])  # (V', N, D)
    norm = np.linalg.norm(emb, axis=-1, keepdims=True)
    return emb / np.maximum(norm, 1e-12), cache.valid


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(dim=1) == labels).float().mean())


def build(labeled, labeled_cache, val, val_cache, *, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256,
          seed: int = 0, device: str = "auto", log=print) -> dict:
    """Fit Tip-Adapter-F on a labeled set and its cache; -> the adapter (tensors + metadata)."""
    check_number("--epochs", epochs, low=1, integer=True)
    check_number("--lr", lr, low=0, low_open=True)
    check_number("--batch-size", batch_size, low=1, integer=True)
    check_number("--seed", seed, low=0, high=2**32 - 1, integer=True)
    dev = resolve_device(device)
    lab_ds, val_ds = data.Dataset.open(labeled), data.Dataset.open(val)
    lab_c = TeacherCache.open(labeled_cache, dataset=lab_ds)
    val_c = TeacherCache.open(val_cache, dataset=val_ds)
    if lab_ds.fingerprint == val_ds.fingerprint:
        raise ConfigError(f"--val {val} is the labeled set itself; search Tip-Adapter's alpha/beta on a validation split")
    if list(val_ds.classnames) != list(lab_ds.classnames):
        raise ConfigError(f"--val {val} has another class list than --labeled {labeled}")
    for name in ("teacher", "zeta", "templates", "text_classifier_norm", "preprocess"):
        if json.dumps(lab_c.attrs.get(name), sort_keys=True) != json.dumps(val_c.attrs.get(name), sort_keys=True):
            raise ConfigError(f"the labeled and validation caches were made with different {name}; use one teacher for both")
    if (lab_ds.labels < 0).any() or (val_ds.labels < 0).any():
        raise ConfigError("Tip-Adapter needs labels on every sample of --labeled and --val")

    torch.manual_seed(seed)
    C, zeta = lab_ds.num_classes, float(lab_c.attrs["zeta"])
    emb, valid = _embeddings(lab_c, list(range(lab_c.train_views)))  # (V, N_l, D)
    keep = np.flatnonzero(valid)
    emb, labels = torch.from_numpy(emb[:, keep]).float(), torch.from_numpy(lab_ds.labels[keep])  # (V, N, D), (N,)
    keys = F.normalize(emb.mean(dim=0), dim=-1)  # (N, D)
    values = F.one_hot(labels, C).float()  # (N, C)
    classifier = torch.from_numpy(lab_c.text_classifier).float()  # (C, D)
    val_view = [val_c.num_views - 1] if val_c.attrs.get("center_view") else [0]
    val_emb, val_valid = _embeddings(val_c, val_view)
    val_f = torch.from_numpy(val_emb[0][val_valid]).float().to(dev)  # (N_v, D)
    val_y = torch.from_numpy(val_ds.labels[val_valid]).to(dev)
    keys, values, classifier = keys.to(dev), values.to(dev), classifier.to(dev)

    zero_shot = _accuracy(val_f @ classifier.T / zeta, val_y)
    training_free = _accuracy(tip_logits(val_f, keys, values, classifier, zeta, 1.0, 1.0), val_y)
    log(f"tip-adapter: {len(keys)} labeled images x {emb.shape[0]} views, {C} classes; val top-1: zero-shot "
        f"{zero_shot:.2f}, Tip-Adapter (alpha = beta = 1) {training_free:.2f}")

    # ---- Tip-Adapter-F: fine-tune the keys on every cached (labeled image, view)
    train_f = emb.reshape(-1, emb.shape[-1]).to(dev)  # (V * N, D)
    train_y = labels.repeat(emb.shape[0]).to(dev)  # (V * N,)
    adapter = torch.nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW([adapter], lr=lr, eps=1e-4)
    steps_per_epoch = math.ceil(len(train_f) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    best, best_keys = -1.0, keys.clone()
    for epoch in range(epochs):
        order = torch.randperm(len(train_f), generator=g).to(dev)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(tip_logits(train_f[idx], adapter, values, classifier, zeta, 1.0, 1.0), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            acc = _accuracy(tip_logits(val_f, adapter, values, classifier, zeta, 1.0, 1.0), val_y)
        if acc > best:
            best, best_keys = acc, adapter.detach().clone()
    # ---- alpha, beta on the validation split (ties: the first, smallest values, of the grid)
    with torch.no_grad():
        affinity = val_f @ best_keys.T  # (N_v, N_l)
        zs = val_f @ classifier.T / zeta
        grid = [(_accuracy(zs + a * torch.exp(-b * (1.0 - affinity)) @ values, val_y), b, a) for b in BETA_GRID for a in ALPHA_GRID]
    top, beta, alpha = max(grid, key=lambda t: t[0])
    log(f"tip-adapter-f: val top-1 {best:.2f} after fine-tuning (alpha = beta = 1), {top:.2f} with alpha = {alpha:.3g}, "
        f"beta = {beta:.3g} searched on {val_ds.root.name}")
    return {
        "format": FORMAT, "version": 1, "dho_version": dho.__version__,
        "keys": best_keys.cpu(), "values": values.cpu(), "classifier": classifier.cpu(), "alpha": float(alpha),
        "beta": float(beta), "zeta": zeta, "classnames": list(lab_ds.classnames),
        "base_teacher": dict(lab_c.attrs["teacher"]), "templates": list(lab_c.attrs["templates"]),
        "text_classifier_norm": lab_c.attrs["text_classifier_norm"], "preprocess": dict(lab_c.attrs["preprocess"]),
        "labeled": str(lab_ds.root), "labeled_fingerprint": lab_ds.fingerprint, "shots": int(len(keys)),
        "val": str(val_ds.root), "val_fingerprint": val_ds.fingerprint,
        "val_top1": {"zero_shot": zero_shot, "tip_adapter": training_free, "tip_adapter_f_fixed": best, "tip_adapter_f": top},
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
    }


def save(adapter: dict, path) -> Path:
    """Write the adapter (plain torch.save of tensors, numbers, strings; loads with weights_only) atomically."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give the file to write, e.g. {path / 'tip-adapter-f.pt'}")
    return write_atomic(path, lambda part: torch.save(adapter, part))


def load(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Tip-Adapter-F file {path} not found; make it with `dho tip-adapter`")
    try:
        adapter = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a foreign file
        raise ConfigError(f"cannot read {path} ({type(e).__name__}); it is not a file written by `dho tip-adapter`") from None
    if not isinstance(adapter, dict) or adapter.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a Tip-Adapter-F file written by `dho tip-adapter`")
    return adapter


def apply(adapter_path, dataset, cache, out, *, device: str = "auto", log=print) -> TeacherCache:
    """A teacher cache of Tip-Adapter-F for `dataset`, from its base cache's embeddings (resumable)."""
    adapter = load(adapter_path)
    dev = resolve_device(device)
    ds = data.Dataset.open(dataset)
    base = TeacherCache.open(cache, dataset=ds)
    if not base.is_complete():
        raise CacheError(f"{cache} is incomplete; finish it with the same `dho precompute-teacher` command")
    if not base.has_embeddings:
        raise CacheError(f"{cache} holds no teacher embeddings; rebuild it with `dho precompute-teacher --store-embeddings`")
    if base.attrs["teacher"] != adapter["base_teacher"] or list(ds.classnames) != adapter["classnames"]:
        raise ConfigError(f"{cache} was made by another teacher or for other classes than {adapter_path} was fitted on")
    base_t = adapter["base_teacher"]
    identity = {
        "model": f"tip-adapter-f({base_t['model']})",
        "pretrained": f"{base_t['pretrained']}; {adapter['shots']} labeled images of {Path(adapter['labeled']).name} "
                      f"(fingerprint {adapter['labeled_fingerprint'][:12]}), alpha {adapter['alpha']:.4g}, beta {adapter['beta']:.4g}",
        "weights_sha256": data.file_sha256(adapter_path),
        "model_config_sha256": base_t["model_config_sha256"],
        "prompt_names": base.prompt_names,
    }
    attrs = {k: base.attrs[k] for k in ("dataset_fingerprint", "num_samples", "classnames", "num_views", "center_view",
                                        "seed", "zeta", "eta", "templates", "text_classifier_norm", "preprocess",
                                        "precision", "embed_dim", "shard_counts", "chunk_len")}
    attrs.update(teacher=identity, topk=None, store_embeddings=False)
    out_cache = TeacherCache.create_or_open(out, attrs, ds.keys, ds.labels, adapter["classifier"].numpy(), dataset=ds)
    keys, values = adapter["keys"].to(dev), adapter["values"].to(dev)
    classifier, zeta, eta = adapter["classifier"].to(dev), float(adapter["zeta"]), float(base.attrs["eta"])
    todo = [(v, s) for s in range(len(ds.shards)) for v in range(base.num_views) if not out_cache.done[v, s]]
    log(f"tip-adapter-cache: {len(todo)} of {out_cache.done.size} units to compute -> {out}")
    for shard in sorted({s for _, s in todo}):
        start, stop = base.shard_range(shard)
        valid = base.valid[start:stop]
        out_cache.write_valid(shard, valid)
        for view in [v for v, s in todo if s == shard]:
            f = torch.from_numpy(base.embeddings(view, start, stop)).float().to(dev)  # (n, D), NaN rows for invalid
            f = F.normalize(torch.nan_to_num(f), dim=-1)
            with torch.no_grad():
                probs = torch.softmax(tip_logits(f, keys, values, classifier, zeta, adapter["alpha"], adapter["beta"]) / eta, dim=-1)
            probs = probs.cpu().numpy().astype(np.float16)  # (n, C)
            probs[~valid] = np.nan
            out_cache.write_unit(view, shard, view_params=base.view_params(view, start, stop), probs=probs)
    out_cache.finalize()
    return TeacherCache.open(out, dataset=ds)


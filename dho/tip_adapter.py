"""Tip-Adapter-F (Zhang et al., ECCV 2022), the few-shot teacher of DHO-F, built from teacher caches.

    dho tip-adapter --labeled LAB --labeled-cache LAB.zarr --val VAL --val-cache VAL.zarr --out TEACHER.pt
    dho tip-adapter-cache TEACHER.pt --dataset DS --cache DS.zarr --out DS-tipf.zarr

The teacher's image tower never runs again: everything comes from the embeddings the caches
store (`dho precompute-teacher --store-embeddings`). With f the L2-normalised image embedding,
W the base teacher's zero-shot classifier (the cache's `text_classifier`) and 1/zeta its logit scale:

    logits(f) = f W^T / zeta + alpha * exp(-beta * (1 - f K^T)) V        (Tip-Adapter, Eq. 6)

- keys K (N_l, D): per labeled image, the mean of its normalised embeddings over the cached
  augmented views, re-normalised. Tip-Adapter's key is the normalised mean of the *raw* features
  over 10 augmented epochs; the caches store only unit embeddings, so dho averages those over all
  V cached views: equal where the raw features of an image's views have one norm (on the demo's
  teacher they vary by 15% and the two keys stay within 3 degrees, with the same top-1:
  docs/fidelity.md);
- values V (N_l, C): the one-hot labels;
- Tip-Adapter-F fine-tunes K with AdamW (lr 1e-3, eps 1e-4) and a cosine schedule over the whole run
  (T_max = epochs x steps per epoch) on the cross-entropy of the logits above at the initial alpha
  and beta. An epoch is Tip-Adapter's: one pass over the N_l labeled images in shuffled batches
  (the last one partial), each image through one augmented view, view e mod V in epoch e (the
  cached stand-in for a fresh random crop), so ceil(N_l / batch) steps per epoch as Tip-Adapter's
  loader; `epoch_views="all"` passes every cached (image, view) each epoch instead (V times the
  steps, dho before Tip-Adapter's epoch). The epoch kept is the best on the validation split
  (Tip-Adapter's code keeps the best on the test set);
- alpha and beta are then searched on the validation split over Tip-Adapter's grid: beta in 200
  steps from 0.1 up to its search scale, alpha in 20 steps from 0.1 up to its scale.

The settings are Tip-Adapter's per-dataset configs (`configs/NAME.yaml`) with `preset="coop:NAME"`
(`OFFICIAL`: initial alpha, search scales, epochs; beta starts at 1 and lr is 1e-3 everywhere), or
`GENERIC` without a preset (alpha = beta = 1 at the start, scales 7 and 3, 20 epochs); an explicit
argument overrides either, and the adapter file records what was used (`settings`).

`apply` writes a teacher cache for any dataset whose cache holds embeddings: the same views,
boxes, keys and validity, with p = softmax(logits / eta) at the base cache's eta, so `dho distill`
reads it like any other cache. Its `teacher` attribute names Tip-Adapter-F, the base model and the
labeled set (fingerprint) it was fitted on; its weights checksum is the adapter file's.

Out of scope: Tip-Adapter without fine-tuning as a separate teacher (alpha/beta search on the
training-free keys is what the first step measures and prints), the raw-feature key rule (the caches
keep unit embeddings only), other adapters.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dho
from dho import data
from dho.atomic import write_atomic
from dho.cache import TeacherCache
from dho.coop import coop_name
from dho.devices import resolve_device
from dho.errors import CacheError, ConfigError, check_choice, check_number

FORMAT = "dho-tip-adapter-f"
SEARCH_STEPS = (200, 20)  # (beta, alpha) grid sizes: `search_step` of every Tip-Adapter config
EPS = 1e-4  # AdamW eps of Tip-Adapter-F
EPOCH_VIEWS = ("one", "all")


def search_grid(scale: float, steps: int) -> tuple[float, ...]:
    """Tip-Adapter's `search_hp` grid: `steps` values from 0.1 up to (not including) `scale`."""
    return tuple(i * (scale - 0.1) / steps + 0.1 for i in range(steps))


BETA_GRID = search_grid(7.0, SEARCH_STEPS[0])  # search scale 7, as ImageNet's config
ALPHA_GRID = search_grid(3.0, SEARCH_STEPS[1])  # scale 3


@dataclass(frozen=True)
class Settings:
    """What Tip-Adapter's config sets per dataset (`init_alpha`, `init_beta`, `search_scale`, `train_epoch`, `lr`)."""

    init_alpha: float
    init_beta: float
    search_scale: tuple[float, float]  # (beta, alpha)
    epochs: int
    lr: float = 1e-3


# Tip-Adapter's configs/*.yaml, by the CoOp name (dho.coop.SPECS); all have init_beta 1, lr 0.001, search_step [200, 20]
OFFICIAL: dict[str, Settings] = {
    "caltech101": Settings(3.0, 1.0, (12.0, 5.0), 20),
    "oxford_pets": Settings(1.17, 1.0, (7.0, 3.0), 20),
    "stanford_cars": Settings(3.0, 1.0, (20.0, 10.0), 20),
    "oxford_flowers": Settings(10.0, 1.0, (50.0, 50.0), 20),
    "food101": Settings(1.17, 1.0, (10.0, 10.0), 20),
    "fgvc_aircraft": Settings(5.0, 1.0, (30.0, 30.0), 20),
    "sun397": Settings(1.17, 1.0, (12.0, 10.0), 20),
    "dtd": Settings(2.0, 1.0, (13.0, 13.0), 20),
    "eurosat": Settings(2.0, 1.0, (12.0, 10.0), 100),
    "ucf101": Settings(3.0, 1.0, (7.0, 3.0), 20),
    "imagenet": Settings(1.17, 1.0, (7.0, 3.0), 20),
}
GENERIC = Settings(1.0, 1.0, (7.0, 3.0), 20)  # without a preset: alpha = beta = 1 at the start, ImageNet's grid


def preset_name(preset: str | None) -> str | None:
    """`coop:NAME` (any of CoOp's spellings) -> its canonical `coop:name`; None stays None."""
    if preset is None:
        return None
    if not (isinstance(preset, str) and preset.startswith("coop:")):
        raise ConfigError(f"--preset must be coop:NAME (Tip-Adapter's settings of a CoOp dataset: {', '.join(OFFICIAL)}); "
                          f"got {preset!r}")
    return "coop:" + coop_name(preset[len("coop:"):])


def settings(preset: str | None = None, *, init_alpha: float | None = None, init_beta: float | None = None,
             search_scale: tuple[float, float] | None = None, epochs: int | None = None,
             lr: float | None = None) -> Settings:
    """The preset's settings (`coop:NAME`: Tip-Adapter's config of that dataset; None: GENERIC), each
    overridden by its argument where given; every value checked."""
    name = preset_name(preset)
    base = GENERIC if name is None else OFFICIAL[name[len("coop:"):]]
    given = dict(init_alpha=init_alpha, init_beta=init_beta, search_scale=search_scale, epochs=epochs, lr=lr)
    s = replace(base, **{k: v for k, v in given.items() if v is not None})
    check_number("--init-alpha", s.init_alpha, low=0, low_open=True)
    check_number("--init-beta", s.init_beta, low=0, low_open=True)
    if not (isinstance(s.search_scale, (tuple, list)) and len(s.search_scale) == 2):
        raise ConfigError(f"--search-scale takes two numbers (BETA,ALPHA), e.g. --search-scale 7,3; got {s.search_scale!r}")
    for which, scale in zip(("beta", "alpha"), s.search_scale):
        check_number(f"--search-scale ({which})", scale, low=0.1, low_open=True)
    check_number("--epochs", s.epochs, low=1, integer=True)
    check_number("--lr", s.lr, low=0, low_open=True)
    return replace(s, search_scale=(float(s.search_scale[0]), float(s.search_scale[1])))


def parse_search_scale(text: str | None) -> tuple[float, float] | None:
    """`--search-scale BETA,ALPHA` -> (beta, alpha), None when not given."""
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise ConfigError(f"--search-scale takes two numbers (BETA,ALPHA), e.g. --search-scale 7,3; got {text!r}")
    return values


def tip_logits(f: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, classifier: torch.Tensor, zeta: float,
               alpha: float, beta: float) -> torch.Tensor:
    """(B, D) normalised embeddings -> (B, C) Tip-Adapter logits (Eq. 6 of Tip-Adapter)."""
    zero_shot = f @ classifier.T / zeta  # (B, C)
    affinity = f @ keys.T  # (B, N_l)
    return zero_shot + alpha * torch.exp(-beta * (1.0 - affinity)) @ values  # (B, C)


def cache_keys(emb: torch.Tensor) -> torch.Tensor:
    """(V, N, D) unit embeddings of each labeled image's views -> (N, D) keys: their mean, re-normalised.

    Tip-Adapter's `build_cache_model` averages the raw features, then normalises; the two agree where an
    image's raw features have one norm over its views (the caches keep only the unit embeddings)."""
    return F.normalize(emb.mean(dim=0), dim=-1)


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


def build(labeled, labeled_cache, val, val_cache, *, preset: str | None = None, init_alpha: float | None = None,
          init_beta: float | None = None, search_scale: tuple[float, float] | None = None, epochs: int | None = None,
          lr: float | None = None, epoch_views: str = "one", batch_size: int = 256, seed: int = 0, device: str = "auto",
          log=print) -> dict:
    """Fit Tip-Adapter-F on a labeled set and its cache; -> the adapter (tensors + metadata).

    `preset` ("coop:NAME") picks Tip-Adapter's settings of that dataset; the other settings override it."""
    s = settings(preset, init_alpha=init_alpha, init_beta=init_beta, search_scale=search_scale, epochs=epochs, lr=lr)
    check_choice("--epoch-views", epoch_views, EPOCH_VIEWS)
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
    shared = np.isin(val_ds.key_bytes, lab_ds.key_bytes)  # (N_val,): a val sample that is also a labeled one
    if shared.any():
        raise ConfigError(f"--val {val} shares {int(shared.sum())} sample(s) with --labeled {labeled} (first: key "
                          f"{val_ds.key(int(np.flatnonzero(shared)[0]))!r}): alpha/beta would be searched on training "
                          "data; draw the validation split apart (`dho split --val-out`)")
    for name in ("teacher", "zeta", "templates", "text_classifier_norm", "preprocess"):
        if json.dumps(lab_c.attrs.get(name), sort_keys=True) != json.dumps(val_c.attrs.get(name), sort_keys=True):
            raise ConfigError(f"the labeled and validation caches were made with different {name}; use one teacher for both")
    if (lab_ds.labels < 0).any() or (val_ds.labels < 0).any():
        raise ConfigError("Tip-Adapter needs labels on every sample of --labeled and --val")

    torch.manual_seed(seed)
    C, zeta = lab_ds.num_classes, float(lab_c.attrs["zeta"])
    alpha0, beta0 = s.init_alpha, s.init_beta
    emb, valid = _embeddings(lab_c, list(range(lab_c.train_views)))  # (V, N_l, D)
    keep = np.flatnonzero(valid)
    emb, labels = torch.from_numpy(emb[:, keep]).float(), torch.from_numpy(lab_ds.labels[keep])  # (V, N, D), (N,)
    V, N = emb.shape[:2]
    keys = cache_keys(emb)  # (N, D)
    values = F.one_hot(labels, C).float()  # (N, C)
    classifier = torch.from_numpy(lab_c.text_classifier).float()  # (C, D)
    val_view = [val_c.num_views - 1] if val_c.attrs.get("center_view") else [0]
    val_emb, val_valid = _embeddings(val_c, val_view)
    val_f = torch.from_numpy(val_emb[0][val_valid]).float().to(dev)  # (N_v, D)
    val_y = torch.from_numpy(val_ds.labels[val_valid]).to(dev)
    keys, values, classifier = keys.to(dev), values.to(dev), classifier.to(dev)

    zero_shot = _accuracy(val_f @ classifier.T / zeta, val_y)
    training_free = _accuracy(tip_logits(val_f, keys, values, classifier, zeta, alpha0, beta0), val_y)
    log(f"tip-adapter: {N} labeled images x {V} views, {C} classes; val top-1: zero-shot {zero_shot:.2f}, "
        f"Tip-Adapter (alpha = {alpha0:g}, beta = {beta0:g}) {training_free:.2f}")

    # ---- Tip-Adapter-F: fine-tune the keys; an epoch passes each labeled image once through view e mod V
    # (Tip-Adapter's epoch, a fresh crop per image) or, with epoch_views="all", through every cached view
    per_epoch = N if epoch_views == "one" else V * N
    if epoch_views == "one" and V < s.epochs:
        log(f"tip-adapter: {V} cached views for {s.epochs} epochs: each view serves {math.ceil(s.epochs / V)} epochs "
            "(Tip-Adapter draws a fresh crop every epoch; more labeled views make them distinct)")
    emb, labels = emb.to(dev), labels.to(dev)
    adapter = torch.nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW([adapter], lr=s.lr, eps=EPS)
    steps_per_epoch = math.ceil(per_epoch / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    best, best_epoch, best_keys = -1.0, -1, keys.clone()
    for epoch in range(s.epochs):
        if epoch_views == "one":
            train_f, train_y = emb[epoch % V], labels  # (N, D), (N,)
        else:
            train_f, train_y = emb.reshape(-1, emb.shape[-1]), labels.repeat(V)  # (V * N, D), (V * N,)
        order = torch.randperm(per_epoch, generator=g).to(dev)
        for idx in order.split(batch_size):
            loss = F.cross_entropy(tip_logits(train_f[idx], adapter, values, classifier, zeta, alpha0, beta0), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            acc = _accuracy(tip_logits(val_f, adapter, values, classifier, zeta, alpha0, beta0), val_y)
        if acc > best:
            best, best_epoch, best_keys = acc, epoch, adapter.detach().clone()
    # ---- alpha, beta on the validation split (ties: the first, smallest values, of the grid)
    beta_grid, alpha_grid = search_grid(s.search_scale[0], SEARCH_STEPS[0]), search_grid(s.search_scale[1], SEARCH_STEPS[1])
    with torch.no_grad():
        affinity = val_f @ best_keys.T  # (N_v, N_l)
        zs = val_f @ classifier.T / zeta
        grid = [(_accuracy(zs + a * torch.exp(-b * (1.0 - affinity)) @ values, val_y), b, a) for b in beta_grid for a in alpha_grid]
    top, beta, alpha = max(grid, key=lambda t: t[0])
    log(f"tip-adapter-f: {s.epochs} epochs x {steps_per_epoch} steps; val top-1 {best:.2f} after fine-tuning (epoch "
        f"{best_epoch + 1}, alpha = {alpha0:g}, beta = {beta0:g}), {top:.2f} with alpha = {alpha:.3g}, beta = {beta:.3g} "
        f"searched on {val_ds.root.name}")
    used = dict(asdict(s), search_scale=list(s.search_scale), preset=preset_name(preset), search_steps=list(SEARCH_STEPS), eps=EPS,
                epoch_views=epoch_views, batch_size=batch_size, steps=s.epochs * steps_per_epoch, schedule="cosine",
                best_epoch=best_epoch + 1, epoch_chosen_on="val", key_rule="normalised mean of the unit view embeddings")
    return {
        "format": FORMAT, "version": 1, "dho_version": dho.__version__,
        "keys": best_keys.cpu(), "values": values.cpu(), "classifier": classifier.cpu(), "alpha": float(alpha),
        "beta": float(beta), "zeta": zeta, "classnames": list(lab_ds.classnames),
        "base_teacher": dict(lab_c.attrs["teacher"]), "templates": list(lab_c.attrs["templates"]),
        "text_classifier_norm": lab_c.attrs["text_classifier_norm"], "preprocess": dict(lab_c.attrs["preprocess"]),
        "labeled": str(lab_ds.root), "labeled_fingerprint": lab_ds.fingerprint, "shots": int(len(keys)),
        "val": str(val_ds.root), "val_fingerprint": val_ds.fingerprint,
        "val_top1": {"zero_shot": zero_shot, "tip_adapter": training_free, "tip_adapter_f_fixed": best, "tip_adapter_f": top},
        "settings": used, "epochs": s.epochs, "lr": s.lr, "batch_size": batch_size, "seed": seed,
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


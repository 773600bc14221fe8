"""Reading a dataset: the samples of a shard in order, checked against the manifest, images decoded to RGB.

`iter_shard` yields the `Sample`s of one shard and checks every key, label member and (version-3
manifests) member digest and the shard's size against the manifest while reading (`check_shard_size`,
`check_sample`; a crc32 per sample, ~30 us for a 100 KB JPEG); `decode_image` / `to_rgb8` turn the stored bytes into an 8-bit RGB PIL image.
`OrderedReader` is a torch IterableDataset that gives each (rank, DataLoader worker) whole shards
(`assign_shards`); it is made on first use, so importing this module imports no torch.

Images larger than PIL's default decompression-bomb limit (about 89 MP) are allowed up to
`MAX_IMAGE_PIXELS` (raised when this module is imported); PIL still refuses images over twice that,
which `prepare` reports as an unreadable file.
Out of scope: the training streams of `dho distill` (`dho/stream.py`) and views (`views.py`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from dho.data.manifest import Dataset, ShardInfo
from dho.data.shards import is_url, sample_digest, tar_samples
from dho.errors import ConfigError, DatasetError

# extensions torchvision's ImageFolder accepts; stored lowercased, bytes never re-encoded
IMAGE_EXTS = ("jpg", "jpeg", "jfif", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
# decode silently up to 200 MP (a 14k x 14k scan); PIL itself refuses above 2x this
MAX_IMAGE_PIXELS = 200_000_000
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


@dataclass
class Sample:
    key: str
    image: Optional[Image.Image]  # RGB; None when read with decode=False
    label: int  # -1 = unlabeled
    index: int  # global row
    shard: int
    data: Optional[bytes] = None  # the encoded image bytes as stored in the shard
    ext: Optional[str] = None  # their extension, e.g. "jpg"


def undecodable(where: str, ext: str, e: Exception, fix: str = "replace the file or leave it out (prepare --skip-bad)") -> DatasetError:
    """The one-line error of image bytes PIL cannot decode; `where` names the sample or file (PIL's own message names
    only its in-memory buffer: '<_io.BytesIO object at 0x...>', left out)."""
    reason = "not an image format PIL can read" if isinstance(e, Image.UnidentifiedImageError) else str(e)
    return DatasetError(f"{where}: cannot decode the {ext} image ({reason}); {fix}")


def to_rgb8(im: Image.Image) -> Image.Image:
    """Every decoded image to 8-bit RGB, scaling what PIL's own convert("RGB") would clip.

    16-bit greyscale (I;16*, and 16-bit data PIL holds as I) is scaled by 65535, so it is not almost
    all white; 32-bit float (F) by 1 when its values lie in [0, 1] (the usual float TIFF), else
    clipped to [0, 255], so it is not all black; alpha (RGBA, LA, PA, palette with transparency) is
    composited over white; CMYK and other modes go through PIL's conversion.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        top = float(a.max()) if a.size else 0.0
        if mode == "F":
            scale = 1.0 if top <= 1.0 else 255.0
        else:
            scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        grey = np.clip(np.round(a * (255.0 / scale)), 0, 255).astype(np.uint8)  # (H, W)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, ext: str, where: str, fix: Optional[str] = None) -> Image.Image:
    """Decode encoded image bytes into an 8-bit RGB PIL image (`to_rgb8`); errors name `where` and say `fix`
    (default: a dataset's, replace the file or prepare --skip-bad)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb8(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise undecodable(where, ext, e, *([fix] if fix else [])) from e


def _image_ext(sample: dict) -> Optional[str]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


CHANGED = "the shard changed since the manifest was written"
RESTORE = "restore the shard from a good copy, or re-create the dataset (`dho index --overwrite` accepts the shard as it is now)"


def check_shard_size(shard: ShardInfo, name: str) -> None:
    """A local shard's size against its manifest's (version 3; a `pipe:` stream's length is known only at its end,
    its samples' digests guard it)."""
    if shard.size is None or is_url(shard.path):
        return
    size = shard.path.stat().st_size
    if size != shard.size:
        raise DatasetError(f"{name}: is {size} bytes but the manifest says {shard.size}; {CHANGED}: {RESTORE}")


def check_sample(name: str, sample: dict, label: int, label_key: str, digest: Optional[int]) -> None:
    """A sample's label member and (version 3) member digest against the manifest's label and digest."""
    key = sample["__key__"]
    if label_key in sample:
        if sample[label_key].strip() != str(label).encode("ascii"):
            raise DatasetError(f"{name}: sample {key!r} has label {sample[label_key][:20]!r} but the manifest says {label}; "
                               f"{CHANGED}: {RESTORE}")
    elif label >= 0:
        raise DatasetError(f"{name}: sample {key!r} has no {label_key!r} member but the manifest says label {label}; "
                           f"{CHANGED}: {RESTORE}")
    if digest is not None and sample_digest(sample) != digest:
        raise DatasetError(f"{name}: sample {key!r} does not match its digest in the manifest (its bytes differ); "
                           f"{CHANGED}: {RESTORE}")


def iter_shard(ds: Dataset, shard_index: int, decode: bool = True) -> Iterator[Sample]:
    """Samples of one shard in order; each key is checked against the manifest while reading."""
    yield from shard_samples(ds.shards[shard_index], shard_index, ds.label_key, ds.root, decode)


def shard_samples(shard: ShardInfo, shard_index: int, label_key: str, root: Path, decode: bool) -> Iterator[Sample]:
    """`iter_shard` of one ShardInfo (what a pool worker is sent instead of the whole dataset)."""
    name = f"shard {shard_index} ({shard.path})"
    if not is_url(shard.path) and not shard.path.is_file():
        raise DatasetError(f"{name} of dataset {root} is missing; restore it or re-run `dho prepare`/`dho index`")
    changed = "the shard changed since the manifest was written; run `dho index` again or restore the shard"
    check_shard_size(shard, name)
    keys, labels, digests = shard.keys, shard.labels, shard.digests  # this shard's slice of the columns, decoded once
    j = -1
    for j, raw in enumerate(tar_samples(shard.path)):
        key = raw["__key__"]
        if j >= shard.count:
            raise DatasetError(f"{name}: holds more than the {shard.count} samples of the manifest (extra key {key!r}); {changed}")
        if key != keys[j]:
            raise DatasetError(f"{name}: sample {j} has key {key!r} but the manifest expects {keys[j]!r}; {changed}")
        ext = _image_ext(raw)
        if ext is None:
            raise DatasetError(f"{name}: sample {key!r} has no image member (one of {', '.join(IMAGE_EXTS)}); {changed}")
        label = labels[j]
        check_sample(name, raw, label, label_key, None if digests is None else digests[j])
        data = raw[ext]
        image = decode_image(data, ext, f"{name} key {key!r}") if decode else None
        yield Sample(key=key, image=image, label=label, index=shard.offset + j, shard=shard_index, data=data, ext=ext)
    if j + 1 != shard.count:
        raise DatasetError(f"{name}: holds {j + 1} samples but the manifest says {shard.count}; {changed}")


def assign_shards(num_shards: int, consumer: int, num_consumers: int) -> list[int]:
    """Whole shards for one consumer (rank x worker), round-robin: consumer c gets c, c + n, c + 2n, ..."""
    if not 0 <= consumer < num_consumers:
        raise ValueError(f"consumer {consumer} not in [0, {num_consumers})")
    return list(range(consumer, num_shards, num_consumers))


def _dist_rank_world() -> tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _ordered_reader_class():
    """OrderedReader is a torch IterableDataset; it is made on first use (`data.OrderedReader`), so the
    data commands (prepare, index, split) never import torch."""
    import torch

    class OrderedReader(torch.utils.data.IterableDataset):
        """Every sample of this (rank, DataLoader worker)'s whole shards, in shard order.

        Consumers are rank x worker (consumer = rank * num_workers + worker). The union over all
        ranks and workers is every sample of `shards` (default: all) exactly once; each yielded
        item carries its global row (`Sample.index`) when `transform` keeps it.
        """

        def __init__(self, ds: Dataset, transform: Optional[Callable] = None, rank: Optional[int] = None,
                     world_size: Optional[int] = None, shards: Optional[Sequence[int]] = None, decode: bool = True):
            super().__init__()
            dist_rank, dist_world = _dist_rank_world()
            self.ds = ds
            self.transform = transform
            self.rank = dist_rank if rank is None else rank
            self.world_size = dist_world if world_size is None else world_size
            self.shards = list(range(len(ds.shards))) if shards is None else list(shards)
            self.decode = decode
            if not 0 <= self.rank < self.world_size:
                raise ConfigError(f"rank {self.rank} is not in [0, world_size={self.world_size})")

        def my_shards(self) -> list[int]:
            info = torch.utils.data.get_worker_info()
            worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
            consumer = self.rank * num_workers + worker
            picked = assign_shards(len(self.shards), consumer, self.world_size * num_workers)
            return [self.shards[i] for i in picked]

        def __iter__(self):
            for s in self.my_shards():
                for sample in iter_shard(self.ds, s, decode=self.decode):
                    yield sample if self.transform is None else self.transform(sample)

    OrderedReader.__qualname__ = "OrderedReader"  # pickled by reference (spawned workers): dho.data.reader.OrderedReader
    return OrderedReader


def __getattr__(name: str):  # PEP 562: module attributes made on first access (dho.data's OrderedReader is this one)
    if name == "OrderedReader":
        cls = _ordered_reader_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Image sources (an ImageNet-style folder, TFDS ``imagenet2012`` as ArrayRecord) as deterministic grain pipelines.

``image_dataset(source, crop_size=256)`` gives a ``grain.MapDataset`` of dicts
``{'image': uint8 [S, S, 3] (ADM centre crop), 'label': int32, 'index': int64 (global example index = position in
the source), 'valid': bool, 'reason': int32 (REASONS)}``, sharded per process (process ``i`` of ``n`` takes
positions ``i, i + n, ...`` of the (optionally shuffled) order), optionally padded to a common length per process
(``pad_to_multiple``: every process yields the same number of full batches; padding has ``index -1``, ``valid
False``, ``reason 'padding'``). ``to_batches`` turns it into a resumable ``IterDataset`` (``get_state``/``set_state``
on its iterator). A file that cannot be read or decoded never stops the run: it comes out with ``valid False``,
a zero image and a reason; ``BadImageCounter`` tallies them for the job summary. Greyscale, CMYK, RGBA, palette and
16-bit images are converted with ``convert('RGB')`` (as torchvision's loader); tiny images are upscaled by the crop.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from mmfm_jax.data.preprocess import center_crop_arr
from mmfm_jax.storage import as_path, is_local

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = ("ok", "read_error", "undecodable", "truncated", "too_large", "padding")
OK, READ_ERROR, UNDECODABLE, TRUNCATED, TOO_LARGE, PADDING = range(len(REASONS))
# torchvision's IMG_EXTENSIONS (case-insensitive)
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------------------------------------------
# Sources: __len__ and read(i) -> (encoded bytes or None, label)


class ImageFolderSource:
    """``root/<class>/**/<file>`` with classes = sorted sub-directory names (label = rank), files sorted per
    directory walk, extensions as torchvision's ``ImageFolder`` (so labels match it and TFDS ``imagenet2012``)."""

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS):
        self.root = as_path(root)  # a local folder or a gs:// URI
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        exts = tuple(e.lower() for e in extensions)
        self.classes, files = _list_folder(self.root)
        if not self.classes:
            raise FileNotFoundError(f"image folder {self.root}: no class sub-directories")
        paths: list[bytes] = []
        labels: list[int] = []
        for label, cls in enumerate(self.classes):
            for rel in files[cls]:
                if rel.lower().endswith(exts):
                    paths.append(rel.encode("utf-8"))
                    labels.append(label)
        if not paths:
            raise FileNotFoundError(f"image folder {self.root}: no files with extensions {exts}")
        self._paths = np.array(paths, dtype=object)  # compact enough, cheap to pickle to workers
        self._labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, i: int) -> epath.Path:
        return self.root / self._paths[i].decode("utf-8")

    def read(self, i: int) -> tuple[bytes | None, int]:
        try:
            return self.path(i).read_bytes(), int(self._labels[i])
        except Exception:  # noqa: BLE001  (unreadable file or failed object read: counted, not fatal)
            return None, int(self._labels[i])

    def describe(self, i: int) -> str:
        return str(self._paths[i].decode("utf-8"))


def _list_folder(root: epath.Path) -> tuple[list[str], dict[str, list[str]]]:
    """-> (sorted class folder names, {class: file paths relative to ``root``}) in ``os.walk`` order: folders
    sorted, file names sorted within each (symlinks followed). An object store is listed in one recursive listing
    (its "folders" are name prefixes, so a class folder exists when it holds a file)."""
    files: dict[str, list[str]] = {}
    if is_local(root):
        for cls in sorted(e.name for e in os.scandir(root) if e.is_dir()):
            files[cls] = [os.path.relpath(os.path.join(dirpath, f), root)
                          for dirpath, _, fnames in sorted(os.walk(root / cls, followlinks=True))
                          for f in sorted(fnames)]
        return list(files), files
    import fsspec

    fs, base = fsspec.core.url_to_fs(os.fspath(root))
    base = base.rstrip("/")
    rels = [f[len(base) + 1:] for f in fs.find(base)]
    for rel in sorted((r for r in rels if "/" in r), key=lambda r: (os.path.dirname(r), os.path.basename(r))):
        files.setdefault(rel.split("/", 1)[0], []).append(rel)
    classes = sorted(files)
    return classes, {c: files[c] for c in classes}


class TfdsSource:
    """A TFDS split read through ``tfds.data_source`` (ArrayRecord, no TensorFlow), images left encoded."""

    def __init__(self, name: str = "imagenet2012", split: str = "train", data_dir: str | os.PathLike | None = None,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds

        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=None if data_dir is None else str(data_dir),
                                        decoders={image_key: tfds.decode.SkipDecoding()})
        except Exception as e:  # noqa: BLE001
            raise FileNotFoundError(
                f"TFDS {name}:{split} not found or not in ArrayRecord format under data_dir={data_dir}: {e}. "
                "Prepare it with `mmfm-jax prepare-imagenet --manual_dir ... --data_dir ...` "
                "(see the README)") from e

    def __len__(self) -> int:
        return len(self._ds)

    def read(self, i: int) -> tuple[bytes | None, int]:
        try:
            rec = self._ds[int(i)]
        except Exception:  # noqa: BLE001  (damaged record: counted, not fatal)
            return None, -1
        data = rec[self.image_key]
        return (bytes(data) if not isinstance(data, bytes) else data), int(rec[self.label_key])

    def describe(self, i: int) -> str:
        return f"{self.name}:{self.split}[{i}]"


CROP_TRAIN = 256  # MM-FM training / encode path: ADM crop 256, then (on device) flip + bicubic 224
CROP_CLS = 224  # [CLS] path of the GMM fit (spec 2c): ADM crop 224 directly


def make_source(kind: str, path: str | os.PathLike | None, split: str = "train",
                name: str = "imagenet2012") -> ImageFolderSource | TfdsSource:
    """``kind='folder'``: ``path`` = the image-folder root (``split`` ignored); ``kind='tfds'``: ``path`` = the TFDS
    ``data_dir`` (None = TFDS default), dataset ``name``, ``split``."""
    if kind == "folder":
        if path is None:
            raise ValueError("make_source: kind='folder' needs a path")
        return ImageFolderSource(path)
    if kind == "tfds":
        return TfdsSource(name, split, path)
    raise ValueError(f"make_source: kind must be 'folder' or 'tfds', got {kind!r}")


# ------------------------------------------------------------------------------------------------------------------
# Decoding and the per-example map


def decode_rgb(data: bytes, max_pixels: int = 1 << 28) -> tuple[Image.Image | None, int]:
    """Encoded bytes -> (RGB PIL image, OK) or (None, reason). Never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                return None, TOO_LARGE
            img.load()
            if w < 1 or h < 1:
                return None, UNDECODABLE
            return (img if img.mode == "RGB" else img.convert("RGB")), OK
    except Image.DecompressionBombError:
        return None, TOO_LARGE
    except UnidentifiedImageError:
        return None, UNDECODABLE
    except OSError as e:
        return None, TRUNCATED if "truncated" in str(e).lower() else UNDECODABLE
    except Exception:  # noqa: BLE001  (Pillow raises assorted errors on damaged files)
        return None, UNDECODABLE


class LoadExample:
    """Global index -> example dict (see the module docstring). Picklable (for grain worker processes)."""

    def __init__(self, source: Any, crop_size: int, max_resized_pixels: int = 1 << 26):
        self.source = source
        self.crop_size = int(crop_size)
        self.max_resized_pixels = int(max_resized_pixels)

    def _bad(self, index: int, label: int, reason: int) -> dict[str, Any]:
        s = self.crop_size
        return {"image": np.zeros((s, s, 3), np.uint8), "label": np.int32(label), "index": np.int64(index),
                "valid": np.bool_(False), "reason": np.int32(reason)}

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            return self._bad(-1, -1, PADDING)
        data, label = self.source.read(index)
        if data is None:
            return self._bad(index, label, READ_ERROR)
        img, reason = decode_rgb(data)
        if img is None:
            return self._bad(index, label, reason)
        w, h = img.size
        if w * h * (self.crop_size / min(w, h)) ** 2 > self.max_resized_pixels:  # e.g. a 1 x 5000 strip
            return self._bad(index, label, TOO_LARGE)
        try:
            crop = center_crop_arr(img, self.crop_size)
        except Exception:  # noqa: BLE001
            return self._bad(index, label, UNDECODABLE)
        return {"image": crop, "label": np.int32(label), "index": np.int64(index), "valid": np.bool_(True),
                "reason": np.int32(OK)}


class _ShardPositions:
    """Position ``k`` of this process's shard -> global example index (or -1 beyond the end: padding)."""

    def __init__(self, order: grain.MapDataset, shard_index: int, shard_count: int):
        self.order, self.shard_index, self.shard_count = order, shard_index, shard_count

    def __call__(self, k: int) -> int:
        pos = self.shard_index + self.shard_count * int(k)
        return int(self.order[pos]) if pos < len(self.order) else -1


def image_dataset(source: Any, crop_size: int = 256, *, shuffle: bool = False, seed: int = 0,
                  shard_index: int | None = None, shard_count: int | None = None,
                  pad_to_multiple: int | None = None) -> grain.MapDataset:
    """This process's share of ``source`` as a ``grain.MapDataset`` of example dicts (module docstring).

    ``shuffle``/``seed``: one global permutation (identical on every process) before sharding. ``shard_index`` /
    ``shard_count`` default to ``jax.process_index()`` / ``jax.process_count()``. ``pad_to_multiple``: pad every
    process's share to the same length, a multiple of this (the per-process batch size) -> full, equal batches.
    """
    n = len(source)
    pi = jax.process_index() if shard_index is None else int(shard_index)
    pc = jax.process_count() if shard_count is None else int(shard_count)
    if not 0 <= pi < pc:
        raise ValueError(f"image_dataset: shard_index {pi} not in [0, {pc})")
    order = grain.MapDataset.range(n)
    if shuffle:
        order = order.shuffle(seed=seed)
    length = len(range(pi, n, pc))
    if pad_to_multiple:
        per = math.ceil(n / pc)
        length = math.ceil(per / pad_to_multiple) * pad_to_multiple
    return grain.MapDataset.range(length).map(_ShardPositions(order, pi, pc)).map(LoadExample(source, crop_size))


def to_batches(ds: grain.MapDataset, batch_size: int, *, num_threads: int = 8, prefetch: int = 16,
               worker_count: int = 0, drop_remainder: bool = False) -> grain.IterDataset:
    """Batches of ``batch_size`` consecutive examples (fixed composition, whatever the threads or workers),
    read ``num_threads`` batches at a time (Pillow releases the GIL), optionally in ``worker_count`` processes
    (needs absl flags parsed). Iterate it; ``it.get_state()`` / ``it.set_state(state)`` resume exactly."""
    it = ds.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


class BadImageCounter:
    """Tallies ``reason`` codes of invalid examples (padding excluded) and keeps a few example indices."""

    def __init__(self, keep: int = 20):
        self.counts = dict.fromkeys(REASONS[1:PADDING], 0)
        self.examples: list[tuple[int, str]] = []
        self.keep = keep
        self.seen = 0

    def update(self, batch: Mapping[str, Any]) -> None:
        reason = np.asarray(batch["reason"]).reshape(-1)
        index = np.asarray(batch["index"]).reshape(-1)
        self.seen += int(np.sum(reason != PADDING))
        for r, i in zip(reason, index):
            if r != OK and r != PADDING:
                self.counts[REASONS[r]] += 1
                if len(self.examples) < self.keep:
                    self.examples.append((int(i), REASONS[r]))

    @property
    def total_bad(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {"seen": self.seen, "bad": self.total_bad, "bad_by_reason": dict(self.counts),
                "bad_examples": [{"index": i, "reason": r} for i, r in self.examples]}


# ------------------------------------------------------------------------------------------------------------------
# TFDS imagenet2012 preparation without TensorFlow


def _iter_tar(path: Path):
    """(base name, file object) for each regular file of a tar, streamed (read each before advancing)."""
    import tarfile

    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                yield os.path.basename(member.name), tar.extractfile(member)


def _imagenet_builder_cls() -> type:
    """tfds' ``imagenet2012`` builder with its TensorFlow calls replaced (file checks, validation labels, the
    CMYK/PNG re-encoding: the original bytes are kept, Pillow decodes them at read time as torchvision does)."""
    import tarfile

    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as ib
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    class Imagenet2012NoTF(ib.Builder, skip_registration=True):
        name = "imagenet2012"
        code_path = None  # no checksums file: the archives come from the manual dir

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="ImageNet ILSVRC 2012 (prepared without TensorFlow; images are the original bytes).",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names_file=imagenet_common.label_names_file()),
                    "file_name": tfds.features.Text(),
                }),
                supervised_keys=("image", "label"),
                homepage="https://image-net.org/",
            )

        def _split_generators(self, dl_manager):
            manual = Path(dl_manager.manual_dir)
            splits = []
            train, val = manual / "ILSVRC2012_img_train.tar", manual / "ILSVRC2012_img_val.tar"
            if train.exists():
                splits.append(tfds.core.SplitGenerator(name=tfds.Split.TRAIN, gen_kwargs={"archive": _iter_tar(train)}))
            if val.exists():
                labels = Path(tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME)).read_text()
                with tarfile.open(val, mode="r:") as tar:
                    names = sorted(tar.getnames())
                splits.append(tfds.core.SplitGenerator(
                    name=tfds.Split.VALIDATION,
                    gen_kwargs={"archive": _iter_tar(val),
                                "validation_labels": dict(zip(names, labels.strip().splitlines()))}))
            if not splits:
                raise FileNotFoundError(f"{manual} holds neither ILSVRC2012_img_train.tar nor ILSVRC2012_img_val.tar")
            return splits

        def _fix_image(self, image_fname, image):
            return image

    return Imagenet2012NoTF


def prepare_imagenet2012(manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Build TFDS ``imagenet2012`` (ArrayRecord) in ``data_dir`` from ``manual_dir/ILSVRC2012_img_{train,val}.tar``
    without TensorFlow. Returns the dataset directory (``data_dir/imagenet2012/<version>``)."""
    import tensorflow_datasets as tfds

    builder = _imagenet_builder_cls()(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return Path(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mmfm_jax.data.images prepare-imagenet --manual_dir DIR --data_dir DIR``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mmfm_jax.data.images")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare-imagenet", help="ImageNet tars -> TFDS imagenet2012 ArrayRecord (no TensorFlow)")
    prep.add_argument("--manual_dir", required=True, help="folder with ILSVRC2012_img_train.tar / _val.tar")
    prep.add_argument("--data_dir", required=True, help="TFDS data_dir to write (e.g. ~/tensorflow_datasets)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out = prepare_imagenet2012(args.manual_dir, args.data_dir)
    print(f"prepared {out}")


if __name__ == "__main__":
    main()

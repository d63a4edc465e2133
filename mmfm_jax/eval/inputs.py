"""The evaluator's image inputs: an ``.npz`` with ``arr_0`` [N, H, W, 3] uint8 (the ADM sample-batch format), a
folder of the sample job's npz shards (``images-*.npz``), or a folder of image files (png/jpg/...; any model's
samples), read in batches (local or ``gs://``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from mmfm_jax.eval import metrics as metrics_lib
from mmfm_jax.storage import as_path, list_files

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def _files(folder: Any) -> list[Any]:
    return [p for p in list_files(folder) if p.suffix.lower() in IMAGE_EXTS]


def image_stream(path: str | os.PathLike, batch: int, limit: int = 0) -> tuple[int, Iterator[np.ndarray]]:
    """-> (number of images, iterator of uint8 [n, H, W, 3] batches) for an npz, sample shards or image files."""
    path = as_path(path)  # local or gs://
    if path.is_file() and path.suffix == ".npz":
        npzs = [path]
    elif path.is_dir():
        npzs = sorted(path.glob("images-*.npz"))
    else:
        raise FileNotFoundError(f"evaluate: input {path} is neither an .npz nor a folder")
    if npzs:
        total = sum(metrics_lib.npz_array_shape(f, "arr_0")[0] for f in npzs)
        n = min(total, limit) if limit else total

        def it_npz():
            seen = 0
            for f in npzs:
                for b in metrics_lib.iter_npz_batches(f, "arr_0", batch):
                    b = b[: n - seen]
                    seen += len(b)
                    if len(b):
                        yield b
                    if seen >= n:
                        return

        return n, it_npz()
    files = _files(path)
    if limit:
        files = files[:limit]
    if not files:
        raise FileNotFoundError(f"evaluate: no images or npz shards in {path}")

    def it_files():
        size = None
        for s in range(0, len(files), batch):
            imgs = []
            for f in files[s:s + batch]:
                with f.open("rb") as fh, Image.open(fh) as im:
                    a = np.asarray(im.convert("RGB"))
                if size is None:
                    size = a.shape
                elif a.shape != size:
                    raise ValueError(f"evaluate: {f} has size {a.shape[:2]}, others {size[:2]}; all images must "
                                     "share one size (the ADM evaluator assumes 256x256)")
                imgs.append(a)
            yield np.stack(imgs)

    return len(files), it_files()

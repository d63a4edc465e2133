"""One process of the 2-process x 4-CPU-device encode test (tests/test_encode_multihost.py).

Usage: ``python tests/mp_encode_worker.py <process_id> <port> <image_root> <workdir> <latent_dir>``. Both processes
run ``run_job("encode", ...)`` on the same image folder into the same workdir / latent folder, and each writes its
returned summary to ``workdir/summary-<process_id>.json``.
"""

import io
import json
import os
from pathlib import Path

import numpy as np

CLASSES = {"a": 5, "b": 5, "c": 4}  # + 2 bad + 1 greyscale = 17 images -> shards of 6, 6, 5 (tiny config)
BAD = {5: "undecodable", 11: "truncated"}


def make_images(root: Path, seed: int = 0) -> Path:
    """A tiny ImageNet-style folder: 17 files, of which two are bad (index 5: not an image, shard 0; index 11: a
    truncated JPEG, shard 1: each process of a 2-process run meets one) and one is greyscale (index 12, decodable).
    Returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, n in CLASSES.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, size=(36 + 3 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"img{i}.JPEG", quality=90)
    (root / "a" / "zz_corrupt.JPEG").write_bytes(b"not a jpeg at all")  # index 5 (shard 0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    (root / "b" / "zz_cut.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # index 11: truncated
    grey = rng.integers(0, 255, size=(30, 30), dtype=np.uint8)
    Image.fromarray(grey, "L").save(root / "b" / "zz_grey.png")  # index 12 (shard 2)
    return root


def encode_config(repo: Path, image_root: Path, latent_dir: Path):
    from mmfm_jax.config_files import load_config

    return load_config(f"{repo}/configs/encode.py:tiny", {"data.root": str(image_root), "output.dir": str(latent_dir)})


def main(argv: list[str]) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("MMFM_NO_PROGRESS", "1")
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    pid, port, image_root, workdir, latent_dir = int(argv[1]), argv[2], Path(argv[3]), Path(argv[4]), Path(argv[5])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from mmfm_jax import distributed
    from mmfm_jax.cli import run_job

    repo = Path(__file__).resolve().parent.parent
    summary = run_job("encode", encode_config(repo, image_root, latent_dir), workdir)
    (workdir / f"summary-{pid}.json").write_text(json.dumps(summary, default=str))
    distributed.sync("mp_encode_worker_done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    import sys

    main(sys.argv)

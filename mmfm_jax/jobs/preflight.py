"""Checks that need the file system or the mesh, run by ``cli.run_job`` after the job's ``validate`` and before the
workdir is created: every input path a job reads exists (local or ``gs://``), and batch sizes divide over the
mesh. Errors are ``ConfigError`` lines naming the key, the path, and where such a file comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import ml_collections
from etils import epath
from jax.sharding import Mesh

from mmfm_jax import parallel
from mmfm_jax.config_utils import ConfigError

RELEASE = "the official release (download: `mmfm-jax fetch-release`; README 'sample')"
FROM = {  # where each kind of input comes from
    "latents": "a latent dataset folder written by `mmfm-jax encode` (<encode workdir>/latents)",
    "source": "a source folder written by `mmfm-jax fit-gmm` (<fit-gmm workdir>/source)",
    "train_run": "the workdir of a `mmfm-jax train` run (config.json + checkpoints/<step>/state)",
    "official_pt": f"an official checkpoint (.pt) from {RELEASE}",
    "decoder": f"the RAE decoder weights (model.pt) from {RELEASE}",
    "stats": f"the normalisation statistics (stat.pt) from {RELEASE}, or an encode workdir's stats",
    "fid_ref": "ADM's reference batch (VIRTUAL_imagenet256_labeled.npz), from " + RELEASE,
    "inception": "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its .npz / .safetensors conversion)",
    "samples": "an .npz (arr_0), a `mmfm-jax sample` workdir, or a folder of images",
    "gmm_pkl": f"the official GMM pickles from {RELEASE}",
    "images": "a folder of class sub-folders with images (<root>/<class>/<file>)",
    "encoder": "a Hugging Face model folder (config.json + weights), or a hub id such as "
               "facebook/dinov2-with-registers-base",
    "tfds": "a TFDS data_dir (`mmfm-jax prepare-imagenet --manual_dir ... --data_dir ...`)",
}

Need = tuple[str, str, str, str]  # (config key, "file" | "dir" | "any", required entry inside a dir or "", FROM key)


def _get(cfg: ml_collections.ConfigDict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _train(cfg) -> Iterator[Need]:
    if cfg.data.kind == "latents":
        yield "data.path", "dir", "manifest.json", "latents"
    if cfg.source.kind != "gaussian":
        yield "source.path", "dir", "metadata.json", "source"


def _sample(cfg) -> Iterator[Need]:
    for name in ("model", "guide"):
        if name == "guide" and not cfg.guide.enabled:
            continue
        if cfg[name].kind == "train":
            yield f"{name}.workdir", "dir", "config.json", "train_run"
        else:
            yield f"{name}.path", "any", "", "official_pt"
    if cfg.source.kind == "gmm":
        yield "source.path", "dir", "metadata.json", "source"
    if cfg.decoder.enabled and not cfg.decoder.random_init:
        yield "decoder.weights", "any", "", "decoder"
        if cfg.decoder.stats:
            yield "decoder.stats", "file", "", "stats"


def _evaluate(cfg) -> Iterator[Need]:
    yield "input.path", "any", "", "samples"
    if cfg.ref.path:
        yield "ref.path", "file", "", "fid_ref"
    if not cfg.inception.random_init:
        yield "inception.weights", "file", "", "inception"


def _encode(cfg) -> Iterator[Need]:
    if cfg.data.source == "folder":
        yield "data.root", "dir", "", "images"
    elif cfg.data.get("tfds_dir"):
        yield "data.tfds_dir", "dir", "", "tfds"
    if cfg.stats.get("import_path"):
        yield "stats.import_path", "file", "", "stats"
    weights = str(cfg.encoder.weights)
    if not cfg.encoder.random_init and weights.startswith(("/", ".", "~", "gs://")):  # a local copy, not a hub id
        yield "encoder.weights", "dir", "", "encoder"


def _fit_gmm(cfg) -> Iterator[Need]:
    if cfg.import_official.cls_pkl:
        yield "import_official.cls_pkl", "file", "", "gmm_pkl"
        if cfg.import_official.spatial_pkl:
            yield "import_official.spatial_pkl", "file", "", "gmm_pkl"
    else:
        yield "data.latents_dir", "dir", "manifest.json", "latents"


INPUTS: dict[str, Callable[[ml_collections.ConfigDict], Iterator[Need]]] = {
    "train": _train, "sample": _sample, "evaluate": _evaluate, "encode": _encode, "fit-gmm": _fit_gmm}


def check_inputs(job: str, cfg: ml_collections.ConfigDict) -> None:
    """Raise ``ConfigError('config.<key> = <path>: ...; it comes from ...')`` for the first missing input."""
    for key, kind, inside, src in (INPUTS[job](cfg) if job in INPUTS else ()):
        value = str(_get(cfg, key))
        path = epath.Path(value)
        hint = f" (expected {FROM[src]})"
        if not path.exists():
            raise ConfigError(f"config.{key} = {value!r}: no such {'folder' if kind == 'dir' else 'file'}{hint}")
        if kind == "file" and path.is_dir():
            raise ConfigError(f"config.{key} = {value!r}: is a folder, expected a file{hint}")
        if kind == "dir" and not path.is_dir():
            raise ConfigError(f"config.{key} = {value!r}: is a file, expected a folder{hint}")
        if inside and not (path / inside).exists():
            raise ConfigError(f"config.{key} = {value!r}: has no {inside}, so it is not finished or not "
                              f"the right kind of folder{hint}")
    if job == "sample":
        for name in ("model", "guide"):
            if (name == "model" or cfg.guide.enabled) and cfg[name].kind == "train":
                _check_train_checkpoint(cfg, name)


def _check_train_checkpoint(cfg, name: str) -> None:
    spec = cfg[name]
    ckdir = epath.Path(str(spec.workdir)) / "checkpoints"
    steps = sorted(int(d.name) for d in ckdir.iterdir() if d.name.isdigit()) if ckdir.is_dir() else []
    key = f"config.{name}.workdir = {str(spec.workdir)!r}"
    if not steps:
        raise ConfigError(f"{key}: no checkpoints in {ckdir} (train wrote none yet?)")
    if int(spec.step) >= 0 and int(spec.step) not in steps:
        raise ConfigError(f"config.{name}.step = {int(spec.step)}: no such checkpoint in {ckdir} (have {steps})")


def check_mesh(job: str, cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Batch sizes the job splits over the mesh's batch shards (``data`` x ``fsdp``) must divide."""
    n = parallel.batch_size_multiple(mesh)
    if job in ("train", "demo"):
        G, A = int(cfg.train.global_batch_size), int(cfg.train.get("grad_accum_steps", 1))
        if G % A == 0 and (G // A) % n:
            raise ConfigError(
                f"config.train.global_batch_size = {G}: the micro-batch {G // A} (= global_batch_size / "
                f"grad_accum_steps {A}) must be a multiple of the mesh's {n} batch shards "
                f"(mesh {dict(mesh.shape)}; change the batch, train.grad_accum_steps or config.mesh)")


def check(job: str, cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    check_mesh(job, cfg, mesh)
    check_inputs(job, cfg)

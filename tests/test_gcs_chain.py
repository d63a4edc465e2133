"""encode -> fit-gmm -> train -> sample -> evaluate on 8 fake devices with a tiny encoder: the ImageNet pipeline in
small, on local disk and on gs:// (a local GCS emulator), where train is SIGKILLed mid-run and resumed from gs://
and sampling restores onto another device count: both chains give bitwise the same outputs."""

import os
import signal
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
from test_encode_job import make_folder

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.gmm.source import load_source
from mmfm_jax.storage import as_path, copy_tree, load_npz, read_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = {"data.kind": "latents", "data.normalize": True, "model.in_channels": 48, "model.input_size": 2,
         "model.num_modes": 3, "model.use_y_conditioning": True, "source.kind": "gmm_mode", "source.y_from": "mode",
         "train.num_steps": 4, "checkpoint.every_steps": 2,
         "source.table_dtype": "bfloat16", "train.adam_mu_dtype": "bfloat16"}  # the memory-saving options


def _train_cli(root: str, hang_at: int) -> None:
    """``mmfm-jax train`` on ``root/train`` in a subprocess (through ``tests/train_hooks.py``), SIGKILLed while it
    waits at ``hang_at``."""
    lat, src = f"{root}/enc/latents", f"{root}/gmm/source"
    flags = [f"--config.{k}={v}" for k, v in {**TRAIN, "data.path": lat, "source.path": src}.items()]
    cmd = [sys.executable, "-m", "tests.train_hooks", f"--hang-at={hang_at}", "train",
           f"--config={REPO}/configs/train.py:tiny", f"--workdir={root}/train", *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", MMFM_NO_PROGRESS="1",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(240, p.kill)
        watchdog.start()
        for line in p.stdout:
            if f"DEBUG: hanging at step {hang_at}" in line:
                break
        watchdog.cancel()
        alive = p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        err.seek(0)
        assert alive, f"train subprocess exited early:\n{err.read()[-3000:]}"


def run_chain(root: str, images: str, kill_train_at: int = 0) -> dict:
    """The five jobs with their workdirs under ``root`` (a local folder or a gs:// URI) -> their summaries."""
    out = {}
    enc = load_config(f"{REPO}/configs/encode.py:tiny", {"data.root": images, "output.flip_views": True})
    out["encode"] = run_job("encode", enc, f"{root}/enc")
    lat = f"{root}/enc/latents"
    gmm = load_config(f"{REPO}/configs/fit_gmm.py:tiny", {"data.latents_dir": lat, "latent.channels": 48,
                                                          "gmm.n_components": 3, "gmm.checkpoint_every": 5})
    out["fit-gmm"] = run_job("fit-gmm", gmm, f"{root}/gmm")
    if kill_train_at:
        _train_cli(root, kill_train_at)
    tr = load_config(f"{REPO}/configs/train.py:tiny", {**TRAIN, "data.path": lat, "source.path": f"{root}/gmm/source"})
    out["train"] = run_job("train", tr, f"{root}/train")
    smp = load_config(f"{REPO}/configs/sample.py:tiny", {
        "model.workdir": f"{root}/train", "source.kind": "gmm", "source.path": f"{root}/gmm/source",
        "decoder.stats": f"{lat}/stats.npz", "mesh.num_devices": 4, "num_samples": 16, "output.merge_npz": True,
        "decoder.overrides": {"latent_dim": 48, "hidden": 16, "layers": 1, "heads": 2, "mlp": 32, "patch": 8,
                              "image_size": 16}})
    out["sample"] = run_job("sample", smp, f"{root}/sample")
    ev = load_config(f"{REPO}/configs/evaluate.py:tiny", {"input.path": f"{root}/sample/samples",
                                                          "ref.path": f"{root}/sample/samples.npz"})
    out["evaluate"] = run_job("evaluate", ev, f"{root}/eval")
    return out


def outputs(root: str) -> dict:
    """Every array the chain wrote under ``root``, read back through epath (local or gs://)."""
    import jax

    from mmfm_jax import parallel
    from mmfm_jax.train.sampling import restore_train_ema

    ds = latents_lib.LatentShards(f"{root}/enc/latents")
    src, _ = load_source(f"{root}/gmm/source")
    _, ema, _, step = restore_train_ema(f"{root}/train", parallel.make_mesh((1, 1), jax.devices()[:1]))
    arrays = {f"latents/{k}": v for k, v in ds.fetch(np.arange(len(ds))).items()}
    arrays.update({f"stats/{k}": v for k, v in load_npz(f"{root}/enc/latents/stats.npz").items()})
    arrays.update({f"source/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(src))})
    arrays.update({f"ema/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(ema))})
    arrays["samples"] = load_npz(f"{root}/sample/samples.npz")["arr_0"]
    metrics = {k: v for k, v in read_json(f"{root}/eval/metrics.json").items() if k not in ("input", "reference")}
    return dict(arrays=arrays, step=step, metrics=metrics)


@pytest.fixture(scope="module")
def local_chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    images = make_folder(tmp / "imgs", n_per_class=8, classes=("a", "b", "c"), bad=False)
    return tmp, images, run_chain(str(tmp / "local"), str(images))


def test_local_chain(local_chain):
    tmp, _, s = local_chain
    lat_dir = tmp / "local" / "enc" / "latents"
    assert s["encode"]["bad_images"] == 0 and latents_lib.LatentShards(lat_dir).manifest["num_examples"] == 48
    assert s["fit-gmm"]["spatial"]["images"] == 24 and np.isfinite(s["fit-gmm"]["em"]["lower_bound"])
    src, _ = load_source(tmp / "local" / "gmm" / "source")
    assert src.means.shape[1:] == (4, 48)
    s_tr = s["train"]
    assert s_tr["final_step"] == 4 and s_tr["source"] == "gmm_mode" and s_tr["y_from"] == "mode"
    assert np.isfinite(s_tr["loss"])
    assert s["sample"]["num_samples"] == 16 and s["evaluate"]["num_images"] == 16
    assert abs(s["evaluate"]["fid"]) < 1e-3  # the samples against themselves
    assert oct(os.stat(tmp / "local" / "eval" / "metrics.json").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _gs_folders() -> list[str]:
    found = []
    for d in {os.getcwd(), REPO, tempfile.gettempdir()}:
        found += [os.path.join(d, n) for n in os.listdir(d) if n.startswith("gs:")]
    return found


def test_chain_on_gcs_equals_local(local_chain, gcs_dir):
    tmp, images, s_local = local_chain
    before = _gs_folders()
    copy_tree(images, f"{gcs_dir}/imgs")
    s = run_chain(gcs_dir, f"{gcs_dir}/imgs", kill_train_at=3)
    assert s["train"]["resumed_from"] == 2 and s["train"]["final_step"] == 4
    untimed = lambda em: {k: v for k, v in em.items() if "seconds" not in k}  # noqa: E731
    assert untimed(s["fit-gmm"]["em"]) == untimed(s_local["fit-gmm"]["em"])
    a, b = outputs(gcs_dir), outputs(str(tmp / "local"))
    assert a["step"] == b["step"] == 4 and sorted(a["arrays"]) == sorted(b["arrays"])
    for k in b["arrays"]:
        np.testing.assert_array_equal(a["arrays"][k], b["arrays"][k], err_msg=k)
    assert a["metrics"] == b["metrics"]
    # the TensorBoard events of both train runs reached gs://, and the workdirs hold what a local one holds
    tb = [p.name for p in (as_path(gcs_dir) / "train" / "tb").iterdir()]
    assert len(tb) == 2 and all(n.startswith("events.out.tfevents.") for n in tb)
    for job in ("enc", "gmm", "train", "sample", "eval"):
        assert (as_path(gcs_dir) / job / "config.json").exists() and (as_path(gcs_dir) / job / "summary.json").exists()
    assert _gs_folders() == before, "a local folder named 'gs:' appeared"


def test_missing_bucket_fails_before_work(gcs_emulator, tmp_path):
    p = subprocess.run([sys.executable, "-m", "mmfm_jax", "train", f"--config={REPO}/configs/train.py:tiny",
                        "--workdir=gs://no-such-bucket-mmfm/run"], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO), timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if "gs://no-such-bucket-mmfm" in x]
    assert len(lines) == 1 and "bucket gs://no-such-bucket-mmfm does not exist" in lines[0], p.stderr[-2000:]
    assert not os.listdir(tmp_path)

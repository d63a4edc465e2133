"""encode -> fit-gmm -> train (a few steps) on 8 fake devices with a tiny encoder: the ImageNet pipeline in small."""

import numpy as np
from test_encode_job import make_folder

from mmfm_jax.cli import run_job
from mmfm_jax.config_utils import load_config
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.gmm.source import load_source


def test_encode_fit_gmm_train_chain(tmp_path, repo_dir):
    root = make_folder(tmp_path / "imgs", n_per_class=8, classes=("a", "b", "c"), bad=False)
    enc = load_config(f"{repo_dir}/configs/encode.py:tiny", {"data.root": str(root), "output.flip_views": True})
    s_enc = run_job("encode", enc, tmp_path / "enc")
    lat_dir = tmp_path / "enc" / "latents"
    assert s_enc["bad_images"] == 0 and latents_lib.LatentShards(lat_dir).manifest["num_examples"] == 48
    gmm = load_config(f"{repo_dir}/configs/fit_gmm.py:tiny", {"data.latents_dir": str(lat_dir),
                                                              "latent.channels": 48, "gmm.n_components": 3})
    s_gmm = run_job("fit-gmm", gmm, tmp_path / "gmm")
    assert s_gmm["spatial"]["images"] == 24 and np.isfinite(s_gmm["em"]["lower_bound"])
    src, _ = load_source(tmp_path / "gmm" / "source")
    assert src.means.shape[1:] == (4, 48)
    tr = load_config(f"{repo_dir}/configs/train.py:tiny", {
        "data.kind": "latents", "data.path": str(lat_dir), "data.normalize": True,
        "model.in_channels": 48, "model.input_size": 2, "model.num_modes": 3, "model.use_y_conditioning": True,
        "source.kind": "gmm_mode", "source.path": str(tmp_path / "gmm" / "source"), "source.y_from": "mode",
        "train.num_steps": 3, "checkpoint.every_steps": 3,
        "source.table_dtype": "bfloat16", "train.adam_mu_dtype": "bfloat16"})  # the memory-saving options
    s_tr = run_job("train", tr, tmp_path / "train")
    assert s_tr["final_step"] == 3 and s_tr["source"] == "gmm_mode" and s_tr["y_from"] == "mode"
    assert np.isfinite(s_tr["loss"])

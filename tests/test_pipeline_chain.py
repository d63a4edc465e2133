"""encode -> fit-gmm -> train -> sample (decoding with the encoder's mean/std) -> evaluate on 8 fake devices with a
tiny random SigLIP2 (MAP head) or ViT-MAE encoder: the ImageNet pipeline in small for the other two encoders (the
DINOv2 chain, on local disk and on gs://, is test_gcs_chain.py)."""

import numpy as np
import pytest
from test_encode_job import make_folder

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.gmm.source import load_source


@pytest.mark.parametrize("encoder", ["siglip2_b", "mae_b"])
def test_encode_fit_gmm_train_chain(tmp_path, repo_dir, encoder):
    root = make_folder(tmp_path / "imgs", n_per_class=8, classes=("a", "b", "c"), bad=False)
    variant = f"tiny_{encoder}"
    enc = load_config(f"{repo_dir}/configs/encode.py:{variant}", {"data.root": str(root), "output.flip_views": True})
    assert enc.encoder.name == encoder
    s_enc = run_job("encode", enc, tmp_path / "enc")
    lat_dir = tmp_path / "enc" / "latents"
    manifest = latents_lib.LatentShards(lat_dir).manifest
    assert s_enc["bad_images"] == 0 and manifest["num_examples"] == 48 and s_enc["grid"] == [2, 2]
    assert s_enc["encoder"] == manifest["extra"]["encoder_name"] == encoder
    with np.load(lat_dir / "stats.npz") as z:
        assert ("mean" in z.files) == (encoder != "siglip2_b")  # MAE's statistics carry a mean, SigLIP2's do not
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
    other = "mae_b" if encoder == "siglip2_b" else "siglip2_b"
    with pytest.raises(ConfigError, match=f"config.encoder.name = '{other}'.*encoded with '{encoder}'"):
        run_job("train", load_config(f"{repo_dir}/configs/train.py:tiny", {
            "data.kind": "latents", "data.path": str(lat_dir), "encoder.name": other}), tmp_path / "bad")
    overrides = {"model.workdir": str(tmp_path / "train"), "source.kind": "gmm",
                 "source.path": str(tmp_path / "gmm" / "source"), "decoder.stats": str(lat_dir / "stats.npz"),
                 "decoder.overrides": {"latent_dim": 48, "hidden": 16, "layers": 1, "heads": 2, "mlp": 32,
                                       "patch": 4, "image_size": 8},
                 "num_samples": 8, "batch_size": 8, "output.images_per_shard": 8}
    with pytest.raises(ConfigError, match=f"config.encoder.name = '{other}'.*trained on '{encoder}' latents"):
        run_job("sample", load_config(f"{repo_dir}/configs/sample.py:tiny", dict(overrides, **{
            "encoder.name": other})), tmp_path / "bad")
    s_sm = run_job("sample", load_config(f"{repo_dir}/configs/sample.py:tiny", overrides), tmp_path / "sample")
    assert s_sm["shards"] == 1 and s_sm["encoder"] == encoder  # found from the latents: the decoder's mean/std
    with np.load(tmp_path / "sample" / "samples" / "images-00000.npz") as z:
        assert z["arr_0"].shape == (8, 8, 8, 3) and z["arr_0"].dtype == np.uint8
    ev = load_config(f"{repo_dir}/configs/evaluate.py:tiny", {"input.path": str(tmp_path / "sample" / "samples"),
                                                              "ref.path": "", "ref.allow_none": True})
    s_ev = run_job("evaluate", ev, tmp_path / "eval")
    assert s_ev["num_images"] == 8 and np.isfinite(s_ev["inception_score"])

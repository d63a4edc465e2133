"""The official release's layout per encoder: fit-gmm imports ``gmm/<encoder>/`` pickles, the sample variants point
at ``checkpoints/<encoder>/``, ``decoders/<encoder>/ViTXL_n08/model.pt`` and ``normalization_stats/<encoder>/``, and
the decoder de-normalises with the encoder's mean/std."""

import pickle

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config
from mmfm_jax.gmm.source import load_source
from mmfm_jax.models import encoders


def _release_gmm(root, rel, k=3, d=4, c=2, h=2, w=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, d)).astype(np.float32)
    gm = GaussianMixture(n_components=k, covariance_type="diag", max_iter=50, random_state=42).fit(x)
    folder = root / "artifacts" / "gmm" / rel
    folder.mkdir(parents=True)
    (folder / "gmm_n8192_diag_k-means++.pkl").write_bytes(pickle.dumps({"model": gm, "labels": gm.predict(x)}))
    means = rng.normal(size=(k, c, h, w))
    (folder / "spatial_gmm_from_cls_n8192_diag_k-means++_flip.pkl").write_bytes(pickle.dumps(
        {"means": means.reshape(k, -1), "variances": np.array([0.5, 1.0, 2.0]), "weights": gm.weights_}))
    return gm, means


@pytest.mark.parametrize("encoder", ["siglip2_b", "mae_b"])
def test_fit_gmm_imports_the_release_gmm(tmp_path, repo_dir, monkeypatch, encoder):
    rel = encoders.get(encoder).release
    gm, means = _release_gmm(tmp_path, rel, seed=len(encoder))
    monkeypatch.chdir(tmp_path)  # the variants' paths are relative to the release download ('artifacts/')
    cfg = load_config(f"{repo_dir}/configs/fit_gmm.py:official_{encoder}", {"latent.grid": (2, 3),
                                                                           "latent.channels": 2})
    s = run_job("fit-gmm", cfg, tmp_path / "run")
    assert s["imported"] and s["event_shape"] == [6, 2]
    src, _ = load_source(tmp_path / "run" / "source")
    np.testing.assert_allclose(np.asarray(src.gmm.means), gm.means_, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(src.means)[1, 1 * 3 + 2], means[1, :, 1, 2], rtol=1e-6)


def test_every_release_card_row_has_a_sample_variant(repo_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg_sample", f"{repo_dir}/configs/sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert len(mod.RELEASE_CARD) == 12
    for enc, setting, steps, ag in mod.RELEASE_CARD:
        rel = encoders.get(enc).release
        c = load_config(f"{repo_dir}/configs/sample.py:{enc}_{setting}_{steps}" + ("_ag" if ag else ""))
        assert c.encoder.name == enc and c.model.kind == "official"
        assert c.model.path == f"artifacts/checkpoints/{rel}/{setting}-gmm-{steps}.pt"
        assert c.decoder.weights == f"artifacts/decoders/{rel}/ViTXL_n08/model.pt"
        assert c.decoder.stats == f"artifacts/normalization_stats/{rel}/stat.pt"
        assert c.guide.enabled == ag and (not ag or c.guide.path.endswith(f"dit-s-{setting}-gmm-25k.pt"))
    best = load_config(f"{repo_dir}/configs/sample.py:imagenet_mode_ag")
    assert best.model.path.endswith("dinov2-b/mode-gmm-100k.pt") and best.guide.enabled
    train = {v: load_config(f"{repo_dir}/configs/train.py:{v}").train.grad_accum_steps
             for v in ("xl_mode", "xl_uncond_gmm", "xl_mode_siglip2_b", "xl_uncond_gmm_siglip2_b", "xl_mode_mae_b",
                       "xl_uncond_gmm_mae_b")}
    assert train == {"xl_mode": 32, "xl_uncond_gmm": 8, "xl_mode_siglip2_b": 8, "xl_uncond_gmm_siglip2_b": 4,
                     "xl_mode_mae_b": 16, "xl_uncond_gmm_mae_b": 4}


@pytest.mark.parametrize("encoder,mean", [("dinov2_b", 0.485), ("siglip2_b", 0.5), ("mae_b", 0.485)])
def test_decoder_denormalises_with_the_encoder_mean_std(repo_dir, encoder, mean):
    from mmfm_jax.train.sample_io import decoder_config

    dcfg = decoder_config(load_config(f"{repo_dir}/configs/sample.py:tiny", {"encoder.name": encoder}))
    assert dcfg.image_mean[0] == mean and dcfg.image_std == encoders.get(encoder).std

"""fit-gmm job on a synthetic latent dataset: EM on [CLS], spatial table, resume, official-pickle import."""

import shutil

import numpy as np
import pytest

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.gmm import diag, spatial
from mmfm_jax.gmm import io as gmm_io
from mmfm_jax.gmm.source import load_source


def make_latents(path, n=96, k=4, d=8, h=2, w=2, c=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 4
    lab = rng.integers(0, k, n)
    cls = (centers[lab] + rng.normal(size=(n, d))).astype(np.float32)
    lat = (rng.normal(size=(n, h * w, c)) + lab[:, None, None]).astype(np.float32)
    writer = latents_lib.LatentShardWriter(path, (h * w, c), "float32", cls_dim=d, grid=(h, w), normalized=False,
                                           num_shards=2)
    idx = np.arange(n)
    for s in range(2):
        sl = slice(s * n // 2, (s + 1) * n // 2)
        writer.write_shard(s, {"latent": lat[sl], "cls": cls[sl], "label": lab[sl].astype(np.int32),
                               "index": idx[sl], "flip": np.zeros(n // 2, np.int32)})
    var = np.full((h * w, c), 2.0, np.float32)
    writer.finalize({"var": var, "eps": np.float32(1e-5)})
    return cls, lat / np.sqrt(var + 1e-5)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, repo_dir):
    data = tmp_path_factory.mktemp("lat") / "latents"
    cls, lat_norm = make_latents(data)
    work = tmp_path_factory.mktemp("gmm")
    cfg = load_config(f"{repo_dir}/configs/fit_gmm.py:tiny", {"data.latents_dir": str(data)})
    s = run_job("fit-gmm", cfg, work)
    return data, work, cfg, s, cls, lat_norm


def test_fit_gmm_outputs_match_reference(fitted):
    data, work, cfg, s, cls, lat_norm = fitted
    assert s["n_components"] == 4 and s["em"]["n_iter"] >= 1
    assert np.isfinite(s["em"]["lower_bound"])
    src, meta = load_source(work / "source")
    assert src.means.shape == (4, 4, 8) and src.variances.shape == (4,)
    gmm, _ = gmm_io.load_gmm(work / "cls_gmm")
    labels = np.asarray(diag.predict(gmm, cls))
    rm, rv, rc = spatial.spatial_stats_numpy(lat_norm, labels, 4, 2, 2, flip=True)
    np.testing.assert_allclose(np.asarray(src.means)[:4], rm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(src.variances)[:4], rv, rtol=1e-4)
    assert s["spatial"]["images"] == 96


def test_fit_gmm_resumes_em(fitted, tmp_path):
    data, work, cfg, s, _, _ = fitted
    # a fit killed after 2 iterations: only the EM state is on disk
    cfg2 = load_config(cfg_path(cfg), {"data.latents_dir": str(data), "gmm.max_iter": 2, "spatial.enabled": False})
    w2 = tmp_path / "w"
    run_job("fit-gmm", cfg2, w2)
    shutil.rmtree(w2 / "cls_gmm")
    assert gmm_io.read_metadata(w2 / "em_state")["iteration"] == 2
    cfg3 = load_config(cfg_path(cfg), {"data.latents_dir": str(data), "spatial.enabled": False})
    s3 = run_job("fit-gmm", cfg3, w2)
    assert s3["em"]["n_iter"] == s["em"]["n_iter"]
    a, _ = gmm_io.load_gmm(work / "cls_gmm")
    b, _ = gmm_io.load_gmm(w2 / "cls_gmm")
    for f in ("weights", "means", "variances"):
        np.testing.assert_allclose(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), rtol=1e-6, atol=1e-7)


def cfg_path(_cfg):
    import pathlib

    return str(pathlib.Path(__file__).parent.parent / "configs" / "fit_gmm.py") + ":tiny"


def test_import_official(tmp_path, repo_dir):
    import pickle

    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    gm = GaussianMixture(3, covariance_type="diag", max_iter=3).fit(rng.normal(size=(50, 5)))
    (tmp_path / "cls.pkl").write_bytes(pickle.dumps({"model": gm, "config": {}, "metrics": {}, "metadata": {}}))
    spatial_d = {"means": rng.normal(size=(3, 8 * 2 * 2)), "variances": np.ones(3), "weights": gm.weights_}
    (tmp_path / "sp.pkl").write_bytes(pickle.dumps(spatial_d))
    cfg = load_config(f"{repo_dir}/configs/fit_gmm.py:tiny", {"import_official.cls_pkl": str(tmp_path / "cls.pkl"),
                                                               "import_official.spatial_pkl": str(tmp_path / "sp.pkl")})
    s = run_job("fit-gmm", cfg, tmp_path / "w")
    assert s["imported"] and s["event_shape"] == [4, 8]
    src, _ = load_source(tmp_path / "w" / "source")
    np.testing.assert_allclose(np.asarray(src.gmm.means), gm.means_, rtol=1e-6)


def test_bad_precision_names_the_key(tmp_path, repo_dir):
    from mmfm_jax.config_utils import ConfigError
    from mmfm_jax.jobs import fit_gmm

    for bad in ("fast", "highest,highest,highest"):
        cfg = load_config(f"{repo_dir}/configs/fit_gmm.py:tiny", {"data.latents_dir": str(tmp_path),
                                                                   "gmm.precision": bad})
        with pytest.raises(ConfigError, match="gmm.precision"):
            fit_gmm.validate(cfg)
    cfg = load_config(f"{repo_dir}/configs/fit_gmm.py:tiny", {"data.latents_dir": str(tmp_path),
                                                               "gmm.precision": "tf32_tf32_f32,highest"})
    fit_gmm.validate(cfg)


def test_read_cls_needs_a_finished_dataset_and_reads_only_listed_shards(tmp_path):
    from mmfm_jax.jobs.fit_gmm import read_cls

    data = tmp_path / "latents"
    cls, _ = make_latents(data)
    got, idx = read_cls(data)  # no sidecars here: read from the records
    np.testing.assert_array_equal(got, cls)
    np.testing.assert_array_equal(idx, np.arange(96))
    # the encode job's sidecars are used when they match the listed shards; a stray one (an unfinished shard) is not
    for s in range(2):
        sl = slice(s * 48, (s + 1) * 48)
        np.savez(data / f"cls-{s:05d}.npz", cls=cls[sl], index=np.arange(96)[sl], flip=np.zeros(48, np.int32))
    np.savez(data / "cls-00002.npz", cls=np.ones((5, 8), np.float32), index=np.arange(96, 101),
             flip=np.zeros(5, np.int32))
    got, idx = read_cls(data)
    np.testing.assert_array_equal(got, cls)
    assert len(idx) == 96
    # a sidecar whose count disagrees with its shard: the records win
    np.savez(data / "cls-00001.npz", cls=cls[:3], index=np.arange(3), flip=np.zeros(3, np.int32))
    np.testing.assert_array_equal(read_cls(data)[0], cls)
    # an encode job that has not finished: refused before any EM runs
    inc = tmp_path / "incomplete"
    w = latents_lib.LatentShardWriter(inc, (4, 8), "float32", cls_dim=8, grid=(2, 2), num_shards=2)
    w.write_shard(0, {"latent": np.zeros((4, 4, 8), np.float32), "cls": np.zeros((4, 8), np.float32),
                      "label": np.zeros(4, np.int32), "index": np.arange(4), "flip": np.zeros(4, np.int32)})
    with pytest.raises(ValueError, match="not complete"):
        read_cls(inc)


def test_sparse_m_step_option(fitted, tmp_path, repo_dir):
    """``gmm.m_step_top``: validated (the error names the key); the job's fit equals the dense one and its summary
    reports the left-out mass."""
    from mmfm_jax.config_utils import ConfigError
    from mmfm_jax.jobs import fit_gmm

    data, work, cfg, s, _, _ = fitted
    bad = load_config(f"{repo_dir}/configs/fit_gmm.py:tiny", {"data.latents_dir": str(data), "gmm.m_step_top": -1})
    with pytest.raises(ConfigError, match="gmm.m_step_top"):
        fit_gmm.validate(bad)
    cfg1 = load_config(f"{repo_dir}/configs/fit_gmm.py:tiny", {"data.latents_dir": str(data), "gmm.m_step_top": 1,
                                                               "spatial.enabled": False})
    s1 = run_job("fit-gmm", cfg1, tmp_path / "w")
    assert s1["em"]["m_step_top"] == 1 and s1["em"]["m_step_dropped"] <= 1e-7
    assert s1["em"]["n_iter"] == s["em"]["n_iter"]
    g0, _ = gmm_io.load_gmm(work / "cls_gmm")
    g1, _ = gmm_io.load_gmm(tmp_path / "w" / "cls_gmm")
    np.testing.assert_allclose(np.asarray(g1.means), np.asarray(g0.means), atol=1e-4)
    np.testing.assert_allclose(np.asarray(g1.variances), np.asarray(g0.variances), rtol=1e-4)


def test_rerun_with_another_config_stops_and_overwrite_refits(fitted, tmp_path):
    """Another gmm.n_components or another latent dataset on a fitted workdir: stop before any work, naming what
    changed (no 'already fitted' mix of an old GMM and a new table); overwrite=True refits from scratch."""
    from mmfm_jax.config_utils import ConfigError

    data, work, cfg, s, _, _ = fitted
    w = tmp_path / "w"
    shutil.copytree(work, w)
    before = {p.name: p.stat().st_mtime_ns for p in (w / "source").iterdir()}
    with pytest.raises(ConfigError, match=r"config\.gmm\.n_components: 4 -> 3"):
        run_job("fit-gmm", load_config(cfg_path(cfg), {"data.latents_dir": str(data), "gmm.n_components": 3}), w)
    other = tmp_path / "other"
    make_latents(other, seed=1)
    with pytest.raises(ConfigError, match=r"config\.data\.latents_dir: .*lat.*/latents' -> .*other'"):
        run_job("fit-gmm", load_config(cfg_path(cfg), {"data.latents_dir": str(other)}), w)
    assert {p.name: p.stat().st_mtime_ns for p in (w / "source").iterdir()} == before
    s2 = run_job("fit-gmm", load_config(cfg_path(cfg), {"data.latents_dir": str(data), "gmm.n_components": 3,
                                                        "overwrite": True}), w)
    assert s2["n_components"] == 3 and s2["em"]["n_iter"] >= 1
    src, _ = load_source(w / "source")
    assert src.n_modes == 3 and src.means.shape[0] == 3

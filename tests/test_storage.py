"""Storage on gs:// (the local GCS emulator) behaves as on disk: atomic writers and file modes, checkpoint fallback
and quarantine, the EM checkpoint's safe replacement (and an interrupted copy), TensorBoard upload."""

import os

import jax
import numpy as np
from etils import epath
from test_checkpoint import TX, Net, _mem_iter, _save_three
from test_train_job import _tb_scalars

from mmfm_jax import parallel
from mmfm_jax.gmm import io as gmm_io
from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.gmm.em import make_state
from mmfm_jax.storage import FILE_MODE, as_path, copy_tree, load_npz, read_json, save_npz_atomic, write_json_atomic
from mmfm_jax.train.checkpoint import Checkpointer
from mmfm_jax.train.state import abstract_train_state
from mmfm_jax.utils import MetricWriter


def test_atomic_writers_local_and_gcs(tmp_path, gcs_dir):
    for root in (str(tmp_path), gcs_dir):
        write_json_atomic(f"{root}/a/x.json", {"v": np.float32(1.5)})
        save_npz_atomic(f"{root}/a/y.npz", z=np.arange(3))
        assert read_json(f"{root}/a/x.json") == {"v": 1.5}
        np.testing.assert_array_equal(load_npz(f"{root}/a/y.npz")["z"], np.arange(3))
        assert sorted(p.name for p in as_path(f"{root}/a").iterdir()) == ["x.json", "y.npz"]  # no temp files
    for name in ("x.json", "y.npz"):  # what open() gives (0644 under umask 022), not mkstemp's 0600
        assert os.stat(tmp_path / "a" / name).st_mode & 0o777 == FILE_MODE
    assert as_path("rel/x") == epath.Path(os.path.abspath("rel/x")) and str(as_path(gcs_dir)) == gcs_dir


def test_checkpoint_fallback_and_quarantine_on_gcs(gcs_dir):
    root = as_path(gcs_dir)
    ref, positions = _save_three(root)
    (root / "ck" / "3" / "data" / "process_0-of-1.json").unlink()
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    target, _, _ = abstract_train_state(Net, TX, mesh, seed=1, num_modes=4)
    it = _mem_iter()
    ck = Checkpointer(root / "ck")
    r = ck.restore(target, it)
    assert r.step == 2 and r.fallback_from == 3
    np.testing.assert_array_equal(np.asarray(r.state.params["a"]["kernel"]), ref.params["a"]["kernel"] * 2)
    np.testing.assert_array_equal(next(it)["latent"], positions[2])
    assert ck.all_steps() == [1, 2] and [p.name.split("-")[0] for p in (root / "ck_corrupt").iterdir()] == ["3"]
    ck.close()


def _em(i: int):
    r = np.random.default_rng(i)
    return make_state(DiagGMM(np.full(4, 0.25, np.float32), r.normal(size=(4, 3)).astype(np.float32),
                              np.ones((4, 3), np.float32)), iteration=i, lower_bound=-float(i))


def test_em_state_on_gcs_replaced_safely(gcs_dir):
    path = as_path(gcs_dir) / "em_state"
    gmm_io.save_em_state(path, _em(1))
    gmm_io.save_em_state(path, _em(2))
    assert int(gmm_io.load_em_state(path).iteration) == 2
    assert not (as_path(gcs_dir) / "em_state.tmp").exists()
    # a copy of a complete new state onto em_state interrupted after em_state's metadata.json went: the complete
    # em_state.tmp is read, and the next save finishes the copy before reusing em_state.tmp
    gmm_io.save_em_state(as_path(gcs_dir) / "new", _em(3))
    copy_tree(as_path(gcs_dir) / "new", as_path(gcs_dir) / "em_state.tmp")
    (path / "metadata.json").unlink()
    assert gmm_io.has_em_state(path) and int(gmm_io.load_em_state(path).iteration) == 3
    gmm_io.save_em_state(path, _em(4))
    st = gmm_io.load_em_state(path)
    assert int(st.iteration) == 4 and float(st.lower_bound) == -4.0
    np.testing.assert_array_equal(np.asarray(st.params.means), _em(4).params.means)


def test_tensorboard_reaches_gcs_at_each_flush(gcs_dir, tmp_path):
    w = MetricWriter(f"{gcs_dir}/tb", enabled=True)
    w.scalars(1, {"a": 1.0, "b": 2.0}, console=False)
    w.flush()
    w.scalars(2, {"a": 3.0}, console=False)
    copy_tree(f"{gcs_dir}/tb", tmp_path / "tb1")
    assert _tb_scalars(tmp_path / "tb1") == {"a": [(1, 1.0)], "b": [(1, 2.0)]}
    stage = w._stage
    w.close()
    copy_tree(f"{gcs_dir}/tb", tmp_path / "tb2")
    assert _tb_scalars(tmp_path / "tb2")["a"] == [(1, 1.0), (2, 3.0)] and not os.path.exists(stage)


def test_latent_shards_on_gcs(gcs_dir, tmp_path, monkeypatch):
    from mmfm_jax.data import latents as lt

    monkeypatch.setenv("MMFM_CACHE_DIR", str(tmp_path / "cache"))
    r = np.random.default_rng(0)
    ex = [{"latent": r.normal(size=(5, 4, 3)).astype(np.float32), "cls": r.normal(size=(5, 2)).astype(np.float32),
           "index": np.arange(5) + 5 * s} for s in range(2)]
    w = lt.LatentShardWriter(f"{gcs_dir}/lat", (4, 3), "float32", cls_dim=2, num_shards=3)
    for s in range(2):
        w.write_shard(s, ex[s])
    # skip-finished-shards and the stale-temp cleanup see what they see on disk (no temp object is ever written)
    assert w.finished_shards() == [0, 1] and w.cleanup_stale() == []
    assert not lt.LatentShards(f"{gcs_dir}/lat", allow_incomplete=True).manifest["complete"]
    w.write_shard(2, ex[0])
    w.finalize({"var": np.ones((4, 3), np.float32)})
    ds = lt.LatentShards(f"{gcs_dir}/lat")
    got = ds.fetch(np.arange(10))
    np.testing.assert_array_equal(got["latent"], np.concatenate([e["latent"] for e in ex]))
    np.testing.assert_array_equal(ds.stats["var"], np.ones((4, 3)))
    cached = sorted(os.listdir(next((tmp_path / "cache").iterdir())))
    assert len(cached) == 3 and all(n.startswith("shard-0000") for n in cached)
    assert sorted(p.name for p in as_path(f"{gcs_dir}/lat").iterdir()) == [
        "manifest.json", "shard-00000.array_record", "shard-00000.json", "shard-00001.array_record",
        "shard-00001.json", "shard-00002.array_record", "shard-00002.json", "stats.npz"]

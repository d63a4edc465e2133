import json

import ml_dtypes
import numpy as np
import pytest

from mmfm_jax.data import latents as lt


def _examples(n, start=0, L=4, C=3, D=5, seed=0):
    r = np.random.default_rng(seed + start)
    return dict(latent=r.normal(size=(n, L, C)).astype(np.float32), cls=r.normal(size=(n, D)).astype(np.float32),
                label=np.arange(start, start + n) % 7, index=np.arange(start, start + n),
                flip=np.arange(n) % 2)


def _write(tmp_path, dtype="bfloat16", shards=(10, 7, 9), normalized=True):
    w = lt.LatentShardWriter(tmp_path / "ds", (4, 3), dtype, cls_dim=5, grid=(2, 2), normalized=normalized,
                             num_shards=len(shards))
    start, allx = 0, []
    for sid, n in enumerate(shards):
        ex = _examples(n, start)
        assert w.write_shard(sid, ex) == n
        allx.append(ex)
        start += n
    return w, {k: np.concatenate([e[k] for e in allx]) for k in allx[0]}


def test_roundtrip_and_manifest(tmp_path):
    w, ref = _write(tmp_path)
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert not m["complete"] and m["num_examples"] == 26 and [s["count"] for s in m["shards"]] == [10, 7, 9]
    with pytest.raises(ValueError, match="not complete"):
        lt.LatentShards(tmp_path / "ds")
    w.finalize({"var": np.full((4, 3), 4.0, np.float32), "eps": np.float32(0.0)})
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["complete"] and m["stats_file"] == "stats.npz" and m["record_bytes"] == 24 + 20 + 12 * 2
    assert w.finished_shards() == [0, 1, 2]
    ds = lt.LatentShards(tmp_path / "ds")
    assert len(ds) == 26 and ds.latent_shape == (4, 3)
    b = ds.fetch([0, 12, 25])
    assert b["latent"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(b["latent"], ref["latent"][[0, 12, 25]].astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(b["cls"], ref["cls"][[0, 12, 25]])
    np.testing.assert_array_equal(b["label"], ref["label"][[0, 12, 25]])
    np.testing.assert_array_equal(b["index"], [0, 12, 25])
    np.testing.assert_array_equal(b["flip"], ref["flip"][[0, 12, 25]])
    # normalisation on read when the stored latents are raw
    w2, ref2 = _write(tmp_path / "raw", "float32", (6,), normalized=False)
    w2.finalize({"var": np.full((4, 3), 4.0, np.float32), "eps": np.float32(0.0)})
    b2 = lt.LatentShards(tmp_path / "raw" / "ds", normalize=True).fetch([1, 2])
    np.testing.assert_allclose(b2["latent"], ref2["latent"][[1, 2]] / 2.0, rtol=1e-6)


def test_atomic_shards(tmp_path):
    w, _ = _write(tmp_path, shards=(5,))
    # a temp file of an unfinished shard (a crashed writer) is not listed
    (tmp_path / "ds" / ".shard-00001.array_record.tmp-123").write_bytes(b"junk")
    assert w.finished_shards() == [0]
    with pytest.raises(RuntimeError, match="1 of 1|shards"):
        lt.LatentShardWriter(tmp_path / "ds", (4, 3), "bf16", cls_dim=5, num_shards=2).finalize()
    with pytest.raises(ValueError, match="latent shape"):
        w.write_shard(3, _examples(2, L=5))


def _collect(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_shuffle_epochs_processes_and_resume(tmp_path):
    w, ref = _write(tmp_path, "float32", (12, 12))
    w.finalize()
    ds = lt.LatentShards(tmp_path / "ds")
    mem = lt.InMemoryLatents({k: ref[k] for k in ("latent", "cls", "label")})
    G = 8  # 24 examples -> 3 global batches per epoch
    it = lt.make_iterator(ds, G, seed=3)
    batches = _collect(it, 6)
    ep1 = np.concatenate([b["index"] for b in batches[:3]])
    ep2 = np.concatenate([b["index"] for b in batches[3:]])
    assert sorted(ep1) == list(range(24)) and sorted(ep2) == list(range(24))
    assert not np.array_equal(ep1, ep2) and not np.array_equal(ep1, np.arange(24))
    # in-memory source: same order, same contents
    mb = _collect(lt.make_iterator(mem, G, seed=3), 6)
    for a, b in zip(batches, mb):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["latent"], b["latent"])
    # two processes: each feeds its half of every global batch, in order
    p0 = _collect(lt.make_iterator(ds, G, seed=3, process_index=0, process_count=2), 6)
    p1 = _collect(lt.make_iterator(ds, G, seed=3, process_index=1, process_count=2), 6)
    for a, b0, b1 in zip(batches, p0, p1):
        np.testing.assert_array_equal(a["index"], np.concatenate([b0["index"], b1["index"]]))
    # resume from a saved state (across the epoch boundary)
    it = lt.make_iterator(ds, G, seed=3)
    _collect(it, 2)
    state = json.loads(lt.iterator_state_bytes(it))
    it2 = lt.make_iterator(ds, G, seed=3)
    it2.set_state(state)
    for a, b in zip(batches[2:], _collect(it2, 4)):
        np.testing.assert_array_equal(a["index"], b["index"])
    # finite epochs: whole global batches only
    fin = list(lt.make_iterator(mem, G, seed=0, num_epochs=1, process_index=1, process_count=2))
    assert len(fin) == 3 and all(b["index"].shape == (4,) for b in fin)

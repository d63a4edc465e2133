"""2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) encode the same latent dataset as one process.

17 images -> 3 shards of the tiny config: process 0 takes shards 0 and 2, process 1 shard 1 and then only lockstep
padding (an uneven last round). Each process meets one bad image, so the summary counts must be gathered. A second
2-process run resumes after a simulated kill (one shard unfinished, stale temp files) and rewrites only that shard.
"""

import json
import os

import jax
import mp_encode_worker as w
import numpy as np
from mp_launch import run_workers

from mmfm_jax.cli import run_job
from mmfm_jax.data import latents as latents_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _by_example(ds: latents_lib.LatentShards) -> dict[str, np.ndarray]:
    ex = ds.fetch(np.arange(len(ds)))
    order = np.lexsort((ex["flip"], ex["index"]))
    return {k: v[order] for k, v in ex.items()}


def test_two_processes_encode_like_one(tmp_path):
    root = w.make_images(tmp_path / "imgs" / "train")
    mp_work, mp_lat = tmp_path / "mp", tmp_path / "mp_latents"
    run_workers("mp_encode_worker.py", [root, mp_work, mp_lat], timeout=180)
    sp_work, sp_lat = tmp_path / "sp", tmp_path / "sp_latents"
    assert jax.process_count() == 1 and jax.device_count() == 8
    s1 = run_job("encode", w.encode_config(REPO, root, sp_lat), sp_work)

    # the summaries: every process returns the gathered totals; process 0 wrote summary.json
    summaries = [json.loads((mp_work / f"summary-{p}.json").read_text()) for p in range(2)]
    assert json.loads((mp_work / "summary.json").read_text())["bad_images"] == len(w.BAD)
    n_images = sum(w.CLASSES.values()) + 3
    want_reasons = {r: sum(v == r for v in w.BAD.values()) for r in s1["bad_by_reason"]}
    for s in (s1, *summaries):
        assert s["images"] == s["images_seen"] == n_images and s["shards"] == 3
        assert s["bad_images"] == len(w.BAD) and s["bad_by_reason"] == want_reasons
        assert sorted((e["index"], e["reason"]) for e in s["bad_examples"]) == sorted(w.BAD.items())
        assert s["examples_written_now"] == 2 * (n_images - len(w.BAD))  # both flip views
    assert summaries[0]["num_processes"] == 2 and summaries[0]["num_examples"] == s1["num_examples"]

    # resume, 2 processes: shard 1 (process 1's) lost its commit point, a killed run left temp files behind
    (mp_lat / "shard-00001.json").unlink()
    (mp_lat / ".shard-00001.array_record.tmp-424242").write_bytes(b"half a shard")
    (mp_lat / ".stats-00002.tmp.npz").write_bytes(b"half a sidecar")
    mtime0 = (mp_lat / "shard-00000.array_record").stat().st_mtime_ns
    run_workers("mp_encode_worker.py", [root, mp_work, mp_lat], timeout=180)
    for p in range(2):
        s = json.loads((mp_work / f"summary-{p}.json").read_text())
        assert s["shards_written_now"] == 1 and s["examples_written_now"] == 10
        assert s["bad_images_now"] == 1 and s["bad_examples_now"] == [{"index": 11, "reason": "truncated"}]
        # the summary totals the whole dataset (the shards of the first run too), from the shard sidecars
        assert s["bad_images"] == len(w.BAD) and s["images_seen"] == n_images
        assert sorted((e["index"], e["reason"]) for e in s["bad_examples"]) == sorted(w.BAD.items())
    assert (mp_lat / "shard-00000.array_record").stat().st_mtime_ns == mtime0

    # the manifests: same shards (file, count, index range), complete, nothing left over
    m_mp, m_sp = (latents_lib.LatentShards(d).manifest for d in (mp_lat, sp_lat))
    assert m_mp["complete"] and m_sp["complete"] and m_mp["num_shards"] == 3
    assert m_mp["shards"] == m_sp["shards"] and [s["count"] for s in m_mp["shards"]] == [10, 10, 10]
    assert m_mp == m_sp
    assert not [p.name for p in mp_lat.iterdir() if ".tmp" in p.name]

    # the records, example by example (index, flip): same latents, [CLS], labels
    a, b = (_by_example(latents_lib.LatentShards(d)) for d in (mp_lat, sp_lat))
    assert len(a["index"]) == 2 * (n_images - len(w.BAD)) and not set(w.BAD) & set(a["index"].tolist())
    for k in ("index", "flip", "label"):
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(a["latent"], b["latent"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["cls"], b["cls"], rtol=1e-5, atol=1e-5)
    # records of one shard file stay in (index, flip) order, whichever process wrote them
    for d in (mp_lat, sp_lat):
        ex = latents_lib.LatentShards(d).fetch(np.arange(10))
        assert (ex["index"][::2] == ex["index"][1::2]).all() and (ex["flip"] == np.tile([0, 1], 5)).all()

    # the [CLS] sidecars and the merged statistics
    for sid in range(3):
        with np.load(mp_lat / f"cls-{sid:05d}.npz") as za, np.load(sp_lat / f"cls-{sid:05d}.npz") as zb:
            np.testing.assert_array_equal(za["index"], zb["index"])
            np.testing.assert_array_equal(za["flip"], zb["flip"])
            np.testing.assert_allclose(za["cls"], zb["cls"], rtol=1e-5, atol=1e-5)
    sa, sb = latents_lib.load_stats(mp_lat), latents_lib.load_stats(sp_lat)
    assert set(sa) == set(sb) == {"var", "mean", "eps"}
    np.testing.assert_allclose(sa["var"], sb["var"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sa["mean"], sb["mean"], rtol=1e-6, atol=1e-7)
    unflipped = a["latent"][a["flip"] == 0].astype(np.float64)
    np.testing.assert_allclose(sa["var"], unflipped.var(0), rtol=1e-4, atol=1e-6)

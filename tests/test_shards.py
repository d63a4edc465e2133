"""The resumable-shards helper and the batch round-up that the encode and sample jobs share."""

import jax

from mmfm_jax import parallel
from mmfm_jax.data.shards import pending_shards


def test_pending_shards_cleans_up_first_and_ignores_unknown_ids():
    done: set[int] = {0, 2, 7, -1}
    calls = []

    def cleanup():
        calls.append("cleanup")
        done.add(3)  # e.g. a shard the cleanup finds complete: decided after it

    def finished():
        calls.append("finished")
        return iter(done)

    assert pending_shards(5, finished, cleanup) == [1, 4]
    assert calls == ["cleanup", "finished"]
    assert pending_shards(3, lambda: ()) == [0, 1, 2]
    assert pending_shards(0, lambda: (0,)) == []


def test_round_up_batch():
    mesh = parallel.make_mesh((4, 2), jax.devices()[:8])
    assert parallel.batch_size_multiple(mesh) == 8
    assert [parallel.round_up_batch(n, mesh) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    one = parallel.make_mesh((1, 1), jax.devices()[:1])
    assert parallel.round_up_batch(5, one) == 5

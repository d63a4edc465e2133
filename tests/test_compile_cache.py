"""``config.compile_cache`` on ``gs://`` (the local GCS emulator): an executable written there by one jit state is
loaded by the next, and nothing lands in a local folder named ``gs:``. (The local-folder case, with a real job, is
in ``test_dead_peer.py``.)"""

import os

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from mmfm_jax import distributed


def test_gs_compile_cache_is_written_and_read(gcs_dir, restore_jax_cache_settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"{gcs_dir}/xla_cache"
    cfg = ml_collections.ConfigDict(dict(compile_cache=uri, compile_cache_min_compile_s=0.0))
    assert distributed.configure_compile_cache(cfg) == uri
    assert jax.config.jax_persistent_cache_enable_xla_caches == "none"  # XLA's file caches need local paths
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)

    def f(x):
        return jnp.sin(x) * 3.0 + jnp.cos(x)

    x = jnp.arange(7.0)
    want = jax.jit(f)(x)
    entries = [p.name for p in epath.Path(uri).iterdir()]
    assert any(e.startswith("jit_f-") for e in entries), entries
    jax.clear_caches()
    n = len(hits)
    assert (jax.jit(f)(x) == want).all()
    assert len(hits) == n + 1
    assert not os.path.exists(tmp_path / "gs:")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmfm_jax import distributed, parallel


def test_eight_devices():
    assert jax.device_count() == 8


def test_mesh_shapes():
    m = parallel.make_mesh({"data": -1, "fsdp": 2})
    assert dict(m.shape) == {"dcn_data": 1, "data": 4, "fsdp": 2}
    m = parallel.make_mesh((2, -1))
    assert dict(m.shape) == {"dcn_data": 1, "data": 2, "fsdp": 4}
    m = parallel.make_mesh(None, jax.devices()[:2])
    assert dict(m.shape) == {"dcn_data": 1, "data": 2, "fsdp": 1}
    with pytest.raises(ValueError, match="config.mesh"):
        parallel.make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="config.mesh"):
        parallel.make_mesh({"data": 4, "fsdp": 4})


def test_logical_rules():
    m = parallel.make_mesh({"data": 4, "fsdp": 2})
    assert parallel.logical_to_mesh_spec(("batch", None)) == P(("dcn_data", "data", "fsdp"), None)
    assert parallel.logical_to_mesh_spec(("batch", None), mesh=m) == P(("data", "fsdp"), None)
    assert parallel.logical_to_mesh_spec(("embed", "mlp")) == P("fsdp", None)
    # a mesh axis is used once
    assert parallel.logical_to_mesh_spec(("batch", "embed"), mesh=m) == P(("data", "fsdp"), None)
    # size-1 axes drop out with a mesh
    m1 = parallel.make_mesh({"data": 8, "fsdp": 1})
    assert parallel.logical_to_mesh_spec(("batch", "embed"), mesh=m1) == P("data", None)
    with pytest.raises(KeyError, match="nope"):
        parallel.logical_to_mesh_spec(("nope",))
    # non-dividing dims replicate
    assert parallel.fit_spec_to_shape(P("fsdp", None), (5, 3), m) == P(None, None)
    assert parallel.fit_spec_to_shape(P("fsdp", None), (6, 3), m) == P("fsdp", None)


def test_constrain_activations_only_inside_the_context():
    """``constrain`` is a no-op outside ``activation_sharding``; inside, the traced value is split on the batch
    (full FSDP: all 8 devices) whatever the input's placement, and a dimension the mesh does not divide stays whole."""
    x = jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3)
    assert parallel.constrain(x, ("batch", None)) is x
    m = parallel.make_mesh({"data": 1, "fsdp": 8})
    xr = jax.device_put(x, parallel.replicated(m))

    def f(a):
        with parallel.activation_sharding(m):
            return parallel.constrain(a * 2, ("batch", None)), parallel.constrain(a[:6] + 1, ("batch", None))

    y, z = jax.jit(f)(xr)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    assert y.addressable_shards[0].data.shape == (2, 3) and z.addressable_shards[0].data.shape == (6, 3)
    assert parallel._ACTIVATIONS.get() is None


def test_state_shardings_from_nnx_metadata():
    from flax import nnx

    m = parallel.make_mesh({"data": 4, "fsdp": 2})
    lin = nnx.Linear(4, 6, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                     rngs=nnx.Rngs(0))
    _, state = nnx.split(lin)
    sh = parallel.state_shardings(m, state)
    assert sh["kernel"].spec == P("fsdp", None)
    assert sh["bias"].is_fully_replicated


def test_host_to_global_roundtrip():
    m = parallel.make_mesh({"data": 4, "fsdp": 2})
    x = np.arange(32, dtype=np.float32).reshape(16, 2)
    g = parallel.host_to_global({"x": x}, m)["x"]
    assert g.shape == (16, 2)
    assert len(g.sharding.device_set) == 8
    np.testing.assert_array_equal(parallel.global_to_host(g), x)
    assert float(jax.jit(jnp.sum)(g)) == x.sum()


def _fake_devices(n, per_slice=None, per_process=4, platform="cpu"):
    from types import SimpleNamespace

    out = []
    for i in range(n):
        d = SimpleNamespace(id=i, process_index=i // per_process, platform=platform, device_kind=platform)
        if per_slice:
            d.slice_index = i // per_slice
        out.append(d)
    return out


def test_dcn_grid_one_block_per_slice_or_process():
    """dcn_data > 1: create_hybrid_device_mesh stacks one (data, fsdp) block per TPU slice (slice_index) or, without
    slices, per process, along the leading dcn_data axis; the batch rule covers it, parameters stay in a block."""
    devs = _fake_devices(8, per_slice=4, per_process=2)
    grid = parallel.device_grid((2, 2, 2), devs[::-1])  # input order does not matter: granules sorted by key
    assert grid.shape == (2, 2, 2)
    assert [sorted(d.id for d in grid[s].ravel()) for s in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert {d.slice_index for d in grid[1].ravel()} == {1}
    grid = parallel.device_grid((2, 4, 1), _fake_devices(8, per_process=4))  # CPU/GPU hosts: processes
    assert [sorted(d.id for d in grid[p].ravel()) for p in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert parallel.device_grid((1, 8, 1), _fake_devices(8, per_process=4)) is None  # plain mesh
    with pytest.raises(ValueError, match=r"config.mesh.dcn_data = 4: the devices form 2 slices"):
        parallel.device_grid((4, 2, 1), devs)
    with pytest.raises(ValueError, match=r"dcn_data=2 \(the batch"):
        parallel.device_grid((1, 8, 1), devs)  # devices of 2 slices need dcn_data = 2
    with pytest.raises(ValueError, match="config.mesh.dcn_data = 2: the devices form 1 processes"):
        parallel.make_mesh({"dcn_data": 2, "data": -1})  # one process, no slices: nothing to span
    m = parallel.make_mesh((1, 4, 2))
    assert parallel.logical_to_mesh_spec(("batch", "embed"), mesh=m) == P(("data", "fsdp"), None)
    assert parallel.batch_size_multiple(m) == 8


def test_distributed_timeouts_and_base_config_validation():
    from mmfm_jax.config_utils import ConfigError, base_config, validate_base

    cfg = base_config()
    assert distributed.distributed_timeouts(cfg.distributed) == dict(
        heartbeat_timeout_seconds=20, shutdown_timeout_seconds=300, initialization_timeout=300)
    validate_base(cfg)
    for key, bad in [("mesh.dcn_data", 0), ("mesh.dcn_data", -1), ("distributed.heartbeat_timeout_s", 0),
                     ("compile_cache", "s3://bucket/x"), ("compile_cache", "gs://"),
                     ("compile_cache_min_compile_s", -1.0)]:
        c = base_config()
        node, leaf = (c, key) if "." not in key else (c[key.split(".")[0]], key.split(".")[1])
        node[leaf] = bad
        with pytest.raises(ConfigError, match=f"config.{key}"):
            validate_base(c)
    c = base_config()
    c.compile_cache = "gs://my-bucket/xla_cache"
    validate_base(c)


def test_maybe_initialize_distributed_passes_the_timeouts(monkeypatch):
    """``MMFM_DISTRIBUTED=auto`` (set by ``launch tpu``) calls ``jax.distributed.initialize()`` with auto-detection and
    the config's heartbeat / shutdown / init timeouts; nothing set: a single process, no call."""
    from mmfm_jax.config_utils import base_config

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for k in ("MMFM_NUM_PROCESSES", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MMFM_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(k, raising=False)
    cfg = base_config()
    cfg.distributed.heartbeat_timeout_s = 7
    monkeypatch.delenv("MMFM_DISTRIBUTED", raising=False)
    assert not distributed.maybe_initialize_distributed(cfg) and not calls
    monkeypatch.setenv("MMFM_DISTRIBUTED", "auto")
    assert distributed.maybe_initialize_distributed(cfg)
    assert calls == [dict(heartbeat_timeout_seconds=7, shutdown_timeout_seconds=300, initialization_timeout=300)]

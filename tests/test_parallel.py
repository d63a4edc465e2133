import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmfm_jax import parallel


def test_eight_devices():
    assert jax.device_count() == 8


def test_mesh_shapes():
    m = parallel.make_mesh({"data": -1, "fsdp": 2})
    assert dict(m.shape) == {"data": 4, "fsdp": 2}
    m = parallel.make_mesh((2, -1))
    assert dict(m.shape) == {"data": 2, "fsdp": 4}
    m = parallel.make_mesh(None, jax.devices()[:2])
    assert dict(m.shape) == {"data": 2, "fsdp": 1}
    with pytest.raises(ValueError, match="config.mesh"):
        parallel.make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="config.mesh"):
        parallel.make_mesh({"data": 4, "fsdp": 4})


def test_logical_rules():
    m = parallel.make_mesh({"data": 4, "fsdp": 2})
    assert parallel.logical_to_mesh_spec(("batch", None)) == P(("data", "fsdp"), None)
    assert parallel.logical_to_mesh_spec(("embed", "mlp")) == P("fsdp", None)
    # a mesh axis is used once
    assert parallel.logical_to_mesh_spec(("batch", "embed")) == P(("data", "fsdp"), None)
    # size-1 axes drop out with a mesh
    m1 = parallel.make_mesh({"data": 8, "fsdp": 1})
    assert parallel.logical_to_mesh_spec(("batch", "embed"), mesh=m1) == P("data", None)
    with pytest.raises(KeyError, match="nope"):
        parallel.logical_to_mesh_spec(("nope",))
    # non-dividing dims replicate
    assert parallel.fit_spec_to_shape(P("fsdp", None), (5, 3), m) == P(None, None)
    assert parallel.fit_spec_to_shape(P("fsdp", None), (6, 3), m) == P("fsdp", None)


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

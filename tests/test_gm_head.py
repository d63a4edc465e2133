"""The GMFlow output head: layout, initialisation, stop-gradient log-std, and use as a sampler's gm_fn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm_jax.flow import gmflow as gf
from mmfm_jax.models.gm_head import GMHead

B, L, D, C, K, DC = 2, 5, 16, 3, 4, 8


def _inputs():
    return jax.random.normal(jax.random.key(0), (B, L, D)), jax.random.normal(jax.random.key(1), (B, DC))


def test_head_layout_and_init():
    head = GMHead(D, C, K, DC, rngs=nnx.Rngs(0), logstd_inner_dim=32)
    feats, cond = _inputs()
    gd, state = nnx.split(head)
    gm = jax.jit(lambda st, f, c: nnx.merge(gd, st)(f, c))(state, feats, cond)
    assert gm.means.shape == (B, L, K, C) and gm.logweights.shape == (B, L, K) and gm.logstds.shape == (B, 1, 1, 1)
    assert all(a.dtype == jnp.float32 for a in gm)
    np.testing.assert_allclose(jax.nn.logsumexp(gm.logweights, -1), 0.0, atol=1e-6)
    np.testing.assert_array_equal(gm.logstds, 0.0)  # zero-initialised last layer: s = 1
    # the projection's raw channels: K*C means (k-major) then K logits
    raw = feats @ head.proj_kernel[...] + head.proj_bias[...]
    np.testing.assert_allclose(gm.means, raw[..., : K * C].reshape(B, L, K, C), atol=1e-5)
    np.testing.assert_allclose(gm.logweights, jax.nn.log_softmax(raw[..., K * C:]), atol=1e-5)
    # logical axis names are metadata for parallel.state_shardings
    assert head.proj_kernel.get_metadata()["out_sharding"] == ("embed", "channels")
    assert head.logstd_layers[1].kernel.get_metadata()["out_sharding"] == ("mlp", None)
    assert head.logstd_layers[0].kernel.shape == (DC, 32)


def test_logstd_uses_stop_gradient_condition_and_constant_option():
    head = GMHead(D, C, K, DC, rngs=nnx.Rngs(0), logstd_inner_dim=32)
    head.logstd_layers[1].kernel[...] = jnp.ones((32, 1)) * 0.1  # make the log-std depend on cond
    feats, cond = _inputs()
    ls = head.logstd(cond)
    assert float(jnp.abs(ls).max()) > 0
    g = jax.grad(lambda c: jnp.sum(head(feats, c).logstds))(cond)
    np.testing.assert_array_equal(g, 0.0)
    const = GMHead(D, C, K, DC, rngs=nnx.Rngs(0), constant_logstd=-1.5)
    np.testing.assert_array_equal(const(feats, cond).logstds, -1.5)
    assert len(const.logstd_layers) == 0
    deep = GMHead(D, C, K, DC, rngs=nnx.Rngs(0), logstd_inner_dim=12, num_logstd_layers=3)
    assert [layer.kernel.shape for layer in deep.logstd_layers] == [(DC, 12), (12, 12), (12, 1)]


def test_split_only_head_and_bf16_compute():
    feats, cond = _inputs()
    split_only = GMHead(D, C, K, DC, rngs=nnx.Rngs(0), project=False, logstd_inner_dim=8)
    raw = jax.random.normal(jax.random.key(2), (B, L, K * (C + 1)))
    gm = split_only.split(raw, cond)
    np.testing.assert_allclose(gm.means[:, :, 1], raw[..., C:2 * C])
    with pytest.raises(ValueError, match="project=False"):
        split_only(feats, cond)
    with pytest.raises(ValueError, match="channels"):
        split_only.split(raw[..., :-1], cond)
    bf = GMHead(D, C, K, DC, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, logstd_inner_dim=8)
    f32 = GMHead(D, C, K, DC, rngs=nnx.Rngs(0), logstd_inner_dim=8)
    gb, g32 = bf(feats, cond), f32(feats, cond)
    assert gb.means.dtype == jnp.float32
    np.testing.assert_allclose(gb.means, g32.means, atol=0.05)


def test_head_drives_the_samplers_and_the_loss():
    """A tiny backbone + head as gm_fn: GM-ODE (2nd order) and the loss run under jit and are finite."""

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.inp = nnx.Linear(C + 1, D, rngs=rngs)
            self.emb = nnx.Linear(1, DC, rngs=rngs)
            self.head = GMHead(D, C, K, DC, rngs=rngs, logstd_inner_dim=8)

        def __call__(self, x, t):
            tt = jnp.broadcast_to(t[:, None, None], x.shape[:-1] + (1,))
            return self.head(jax.nn.silu(self.inp(jnp.concatenate([x, tt], -1))), self.emb(t[:, None]))

    gd, state = nnx.split(Tiny(nnx.Rngs(3)))
    x1 = jax.random.normal(jax.random.key(4), (B, L, C))
    t = jnp.array([0.5, 0.9])

    @jax.jit
    def run(st, x):
        fn = lambda xx, tt: nnx.merge(gd, st)(xx, tt)
        batch = gf.transition_inputs(x, x[::-1], t, x, 0.5)
        return gf.gm_sample(fn, x, gf.gm_grid(3, 4), num_substeps=4, order=2), gf.transition_nll(fn(x, t), batch)

    ode, loss = run(state, x1)
    assert ode.shape == (B, L, C) and bool(jnp.all(jnp.isfinite(ode)))
    assert loss.shape == (B,) and bool(jnp.all(jnp.isfinite(loss)))

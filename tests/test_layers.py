"""models/layers.py: the shared Dense, LayerNorm and attention, and the one preset convention of the model configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm_jax.models.decoder import DecoderConfig
from mmfm_jax.models.dinov2 import Dinov2Config
from mmfm_jax.models.ditdh import DiTDHConfig
from mmfm_jax.models.layers import Dense, LayerNorm, attention, attention_impl
from mmfm_jax.models.mae import MAEConfig
from mmfm_jax.models.siglip import SiglipVisionConfig

CONFIGS = (DiTDHConfig, DecoderConfig, Dinov2Config, SiglipVisionConfig, MAEConfig)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_has_public_presets(cls):
    assert cls.PRESETS, cls
    for name in cls.PRESETS:
        assert isinstance(cls.preset(name), cls)
    name = next(iter(cls.PRESETS))
    assert cls.preset(name, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match=f"{cls.__name__}.preset: unknown 'nope'"):
        cls.preset("nope")
    with pytest.raises(ValueError, match=r"unknown fields \['no_such_field'\]"):
        cls.preset(name, no_such_field=1)


def test_preset_values():
    assert DiTDHConfig.preset("S", num_modes=1000).hidden_size == (384, 2048)
    assert DecoderConfig.preset("XL") == DecoderConfig()
    plain = Dinov2Config.preset("base", num_register_tokens=0)
    assert (plain.num_register_tokens, plain.antialias, plain.mlp_hidden) == (0, False, 3072)
    assert Dinov2Config.preset("giant").mlp_hidden == 4096
    assert SiglipVisionConfig.preset("base").image_size == 256 and MAEConfig.preset("base").pretrained_grid == 14


def test_layernorm_affine_options():
    x = np.random.default_rng(0).standard_normal((2, 3, 8), np.float32) * 3 + 1
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    x = jnp.asarray(x)
    ln = LayerNorm(8)
    ln.scale[...] = jnp.full((8,), 2.0)
    ln.bias[...] = jnp.full((8,), 0.5)
    np.testing.assert_allclose(ln(x), ref * 2 + 0.5, atol=1e-5)
    np.testing.assert_allclose(ln(x, affine=False), ref, atol=1e-5)
    bare = LayerNorm(8, elementwise_affine=False)
    assert not jax.tree.leaves(nnx.state(bare, nnx.Param))
    np.testing.assert_array_equal(bare(x), ln(x, affine=False))
    assert bare(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16  # statistics in fp32, result in the input dtype


def test_dense_out_dtype_and_metadata():
    d = Dense(4, 6, names=("embed", "heads"), dtype=jnp.bfloat16, out_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert d.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert d.bias.get_metadata()["out_sharding"] == ("heads",)
    assert d(jnp.ones((2, 4))).dtype == jnp.float32
    assert Dense(4, 6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).dtype == jnp.bfloat16


def test_attention_implementations_agree():
    q, k, v = np.random.default_rng(0).standard_normal((3, 2, 5, 3, 8), np.float32)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
    for impl in ("xla", "matmul"):
        np.testing.assert_allclose(jax.jit(attention, static_argnums=3)(q, k, v, impl), ref, atol=1e-5)
    assert attention_impl("auto", jnp.float32, 64, cpu_impl="matmul") == "matmul"  # tests run on CPU
    assert attention_impl("auto", jnp.float32, 64) == "xla"
    with pytest.raises(ValueError, match="attention implementation"):
        attention_impl("flash", jnp.float32, 64)

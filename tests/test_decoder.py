"""RAE decoder: parity with the official GeneralDecoder + RAE.decode (fixture rae_decoder_small), converter, uint8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.convert.common import CheckpointError, load_state_dict
from mmfm_jax.convert.decoder import load_decoder
from mmfm_jax.models.decoder import (
    DecoderConfig,
    RAEDecoder,
    abstract_decoder,
    decode_latents,
    decoder_pos_embed,
    latent_stats_to_tokens,
    to_uint8,
)


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    path = fixtures_dir / "rae_decoder_small.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return path, arrays


@pytest.fixture(scope="module")
def decoder(fx):
    return load_decoder(fx[0], "parity", prefix="param/")


def test_parity_logits_image_and_decode(fx, decoder):
    _, a = fx
    b, c, h, w = a["input/z_normalized"].shape
    # official [B, C, H, W] -> tokens-last [B, L, C]
    z = a["input/z_normalized"].reshape(b, c, h * w).transpose(0, 2, 1)
    var_lc = latent_stats_to_tokens(a["input/latent_var"], h * w, c)

    @jax.jit
    def run(tokens, z):
        logits = decoder.logits(tokens)
        return (logits, decoder.unpatchify(logits), decode_latents(decoder, z, a["input/latent_var"]),
                decode_latents(decoder, z, var_lc, mean=jnp.zeros((c,), jnp.float32)))

    with jax.default_matmul_precision("highest"):
        logits, image, out, out2 = run(jnp.asarray(a["input/tokens"]), jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(logits), a["output/logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(image), a["output/image"].transpose(0, 2, 3, 1), atol=1e-5)
    assert out.shape == (2, 64, 64, 3) and out.dtype == jnp.float32
    err = float(np.abs(np.asarray(out) - a["output/image_denorm"].transpose(0, 2, 3, 1)).max())
    assert err < 1e-5, err
    # the [L, C] form of the variance (plus a zero [C] mean) gives the same images
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-6)


def test_fixed_pos_embed_matches_checkpoint(fx):
    _, a = fx
    np.testing.assert_allclose(decoder_pos_embed(64, 16), a["param/decoder_pos_embed"], atol=1e-6)
    # a freshly built decoder carries the same fixed table (built on the fly, like the official constructor)
    fresh = nnx.eval_shape(lambda: RAEDecoder(DecoderConfig.preset("parity"), rngs=nnx.Rngs(0)))
    assert fresh.decoder_pos_embed.get_value().shape == (1, 257, 64)


def test_converter_is_strict(fx):
    sd = load_state_dict(fx[0], prefix="param/")
    missing = {k: v for k, v in sd.items() if k != "decoder_layers.1.attention.attention.key.bias"}
    with pytest.raises(CheckpointError, match="decoder_layers.1.attention.attention.key.bias"):
        load_decoder(missing, "parity")
    with pytest.raises(CheckpointError, match="mask_token"):
        load_decoder({**sd, "mask_token": np.zeros((1, 1, 64), np.float32)}, "parity")
    bad = dict(sd, **{"decoder_pred.weight": np.zeros((47, 64), np.float32)})
    with pytest.raises(CheckpointError, match="decoder_pred.weight"):
        load_decoder(bad, "parity")
    with pytest.raises(CheckpointError, match="more than config.layers"):
        load_decoder(sd, DecoderConfig.preset("parity", layers=1))


def test_xl_shape_param_count_and_logical_axes():
    cfg = DecoderConfig.preset("XL")
    assert (cfg.latent_dim, cfg.hidden, cfg.layers, cfg.heads, cfg.mlp, cfg.patch, cfg.image_size, cfg.ln_eps) == (
        768, 1152, 28, 16, 4096, 16, 256, 1e-12)
    model = abstract_decoder(cfg)
    state = nnx.state(model)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) == 415_352_704  # spec 2f
    mesh = parallel.make_mesh((2, 4))
    sh = parallel.state_shardings(mesh, state)
    assert sh["decoder_layers"][0]["intermediate"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
    assert sh["decoder_layers"][0]["output"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    out = jax.eval_shape(lambda m, t: m(t), model, jax.ShapeDtypeStruct((2, 256, 768), jnp.float32))
    assert out.shape == (2, 256, 256, 3)


def test_to_uint8_truncates_like_reference():
    x = jnp.asarray([-0.3, 0.0, 0.5, 0.999, 1.0, 1.7, 0.00392157, 0.6])
    got = np.asarray(to_uint8(x))
    want = (np.clip(np.asarray(x, np.float32), 0, 1) * np.float32(255)).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, [0, 0, 127, 254, 255, 255, 1, 153])
    assert got.dtype == np.uint8

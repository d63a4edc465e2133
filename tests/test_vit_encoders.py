"""SigLIP2 and ViT-MAE ports: parity with transformers (fixtures), strict checkpoint loading, MM-FM encode."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from test_dinov2 import regenerate_weights

from mmfm_jax.convert.common import CheckpointError
from mmfm_jax.convert.mae import load_mae
from mmfm_jax.convert.siglip import load_siglip
from mmfm_jax.models import mae as mae_lib
from mmfm_jax.models import siglip as siglip_lib
from mmfm_jax.ops.resize import bicubic_weights


def _fixture(fixtures_dir, name):
    spec = json.loads((fixtures_dir / f"{name}.json").read_text())
    with np.load(fixtures_dir / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return spec, arrays, regenerate_weights(spec)


def _write(d, config, weights):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    save_file(weights, str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="module")
def siglip(fixtures_dir, tmp_path_factory):
    spec, a, w = _fixture(fixtures_dir, "siglip2_small")
    # the hub file is a whole SiglipModel: text tower and logit scale/bias beside the vision keys
    w = dict(w, logit_scale=np.ones(1, np.float32), logit_bias=np.zeros(1, np.float32),
             **{"text_model.embeddings.token_embedding.weight": np.ones((8, 48), np.float32)})
    cfg = dict(model_type="siglip", vision_config=dict(spec["config"], model_type="siglip_vision_model"),
               text_config=dict(hidden_size=48))
    d = _write(tmp_path_factory.mktemp("siglip") / "ckpt", cfg, w)
    return spec, a, w, d, load_siglip(d)


@pytest.fixture(scope="module")
def mae(fixtures_dir, tmp_path_factory):
    spec, a, w = _fixture(fixtures_dir, "mae_small")
    d = _write(tmp_path_factory.mktemp("mae") / "ckpt", dict(spec["config"], model_type="vit_mae"), w)
    return spec, a, w, d, load_mae(d)


def _nhwc(a):
    return jnp.asarray(a["input/pixel_values"].transpose(0, 2, 3, 1))


def test_siglip_parity(siglip):
    _, a, _, _, model = siglip
    assert model.config.hidden_act == "gelu_pytorch_tanh" and model.config.pretrained_grid == 4
    x = _nhwc(a)
    with jax.default_matmul_precision("highest"):
        hs, pooled = nnx.jit(lambda m, x: m(x))(model, x)
        z, g = nnx.jit(lambda m, x: siglip_lib.encode_mmfm(m, x))(model, x)
    errs = {"tokens": np.abs(np.asarray(hs) - a["output/last_hidden_state_affine"]).max(),
            "pooled": np.abs(np.asarray(pooled) - a["output/pooler_output_affine"]).max(),
            "latent": np.abs(np.asarray(z) - a["output/last_hidden_state_noaffine"]).max(),
            "global": np.abs(np.asarray(g) - a["output/global_noaffine"]).max()}
    print("siglip parity max abs:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) < 1e-5
    nchw = np.asarray(z).transpose(0, 2, 1).reshape(2, 48, 4, 4)  # tokens-last row-major -> official
    assert np.abs(nchw - a["output/latent_nchw_noaffine"]).max() < 1e-5


def test_mae_parity_and_position_table(mae):
    _, a, w, _, model = mae
    assert model.config.layer_norm_eps == 1e-12 and model.config.pretrained_grid == 3
    x = _nhwc(a)
    with jax.default_matmul_precision("highest"):
        pos = np.asarray(model.pos_embed((4, 4)))
        hs = nnx.jit(lambda m, x: m(x))(model, x)
        hs_na = nnx.jit(lambda m, x: m(x, final_affine=False))(model, x)
        z, g = nnx.jit(lambda m, x: mae_lib.encode_mmfm(m, x))(model, x)
    errs = {"pos": np.abs(pos - a["intermediate/pos_embed_interpolated"]).max(),
            "affine": np.abs(np.asarray(hs) - a["output/last_hidden_state_affine"]).max(),
            "noaffine": np.abs(np.asarray(hs_na) - a["output/last_hidden_state_noaffine"]).max(),
            "latent": np.abs(np.asarray(z) - a["output/patch_tokens_noaffine"]).max(),
            "global": np.abs(np.asarray(g) - a["output/global_noaffine"]).max()}
    print("mae parity max abs:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert errs["pos"] < 5e-6 and max(errs.values()) < 1e-5
    np.testing.assert_array_equal(a["output/ids_restore"], np.tile(np.arange(16), (2, 1)))  # identity order
    # the table is torch's plain bicubic (a = -0.75), not jax.image.resize's (a = -0.5)
    grid = w["vit.embeddings.position_embeddings"][0, 1:].reshape(3, 3, 48).astype(np.float64)
    m = bicubic_weights(3, 4)
    np.testing.assert_allclose(pos[0, 1:], np.einsum("oh,hwd,pw->opd", m, grid, m).reshape(16, 48), atol=1e-5)
    jax_pos = np.asarray(jax.image.resize(jnp.asarray(grid, jnp.float32), (4, 4, 48), "bicubic", antialias=False))
    assert np.abs(jax_pos.reshape(16, 48) - pos[0, 1:]).max() > 1e-3
    np.testing.assert_array_equal(pos[0, 0], w["vit.embeddings.position_embeddings"][0, 0])  # CLS row kept


def test_encode_stats(mae, siglip):
    """Latents are normalised per position ([C, H, W] or [L, C] stats; mean when given); globals never are."""
    _, a, _, _, model = mae
    x = _nhwc(a)
    var = np.random.default_rng(0).uniform(0.5, 2.0, (48, 4, 4)).astype(np.float32)
    mean = np.random.default_rng(1).normal(size=(48, 4, 4)).astype(np.float32)
    enc = nnx.jit(mae_lib.encode_mmfm)
    with jax.default_matmul_precision("highest"):
        z, g = enc(model, x, var, mean)
        z2, g2 = enc(model, x, var.reshape(48, 16).T, mean.reshape(48, 16).T)
    expect = (a["output/latent_nchw_noaffine"] - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.asarray(z).transpose(0, 2, 1).reshape(2, 48, 4, 4), expect, atol=2e-5)
    np.testing.assert_allclose(np.asarray(z2), np.asarray(z), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g), a["output/global_noaffine"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(g2), np.asarray(g))
    _, sa, _, _, sm = siglip
    with jax.default_matmul_precision("highest"):
        zs, gs = nnx.jit(siglip_lib.encode_mmfm)(sm, _nhwc(sa), var)
    expect = sa["output/latent_nchw_noaffine"] / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.asarray(zs).transpose(0, 2, 1).reshape(2, 48, 4, 4), expect, atol=2e-5)
    np.testing.assert_allclose(np.asarray(gs), sa["output/global_noaffine"], atol=1e-5)
    with pytest.raises(ValueError, match="stats_var"):
        mae_lib.encode_mmfm(model, x, np.ones((48, 3, 3), np.float32))


def test_load_errors_name_the_key(siglip, mae, tmp_path):
    spec, _, w, d, _ = siglip
    cfg = json.loads((d / "config.json").read_text())
    k = "vision_model.encoder.layers.1.mlp.fc1.weight"
    _write(tmp_path / "s1", cfg, dict(w, **{k: w[k][:10]}))
    with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.1\.mlp\.fc1\.weight.*shape"):
        load_siglip(tmp_path / "s1")
    _write(tmp_path / "s2", cfg, {kk: v for kk, v in w.items() if kk != "vision_model.head.probe"})
    with pytest.raises(CheckpointError, match=r"missing key 'vision_model\.head\.probe'"):
        load_siglip(tmp_path / "s2")
    _write(tmp_path / "s3", cfg, dict(w, **{"vision_model.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['vision_model\.extra\.weight'\]"):
        load_siglip(tmp_path / "s3")
    _, _, mw, md, _ = mae
    mcfg = json.loads((md / "config.json").read_text())
    _write(tmp_path / "m1", mcfg, {kk: v for kk, v in mw.items() if kk != "vit.layernorm.bias"})
    with pytest.raises(CheckpointError, match=r"missing key 'vit\.layernorm\.bias'"):
        load_mae(tmp_path / "m1")
    _write(tmp_path / "m2", mcfg, dict(mw, **{"vit.encoder.layer.2.layernorm_before.weight": np.ones(48, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['vit\.encoder\.layer\.2\.layernorm_before"):
        load_mae(tmp_path / "m2")
    # a bare ViTMAEModel file (no 'vit.' prefix, no decoder) loads the same encoder
    _write(tmp_path / "m3", mcfg, {kk[4:]: v for kk, v in mw.items() if kk.startswith("vit.")})
    m3 = load_mae(tmp_path / "m3")
    np.testing.assert_array_equal(np.asarray(m3.layernorm.bias[...]), mw["vit.layernorm.bias"])


def test_presets_bf16_and_sharding_names():
    s = siglip_lib.SiglipVisionConfig.preset("base")
    assert (s.hidden_size, s.num_hidden_layers, s.image_size, s.pretrained_grid) == (768, 12, 256, 16)
    m = mae_lib.MAEConfig.preset("base")
    assert (m.hidden_size, m.layer_norm_eps, m.pretrained_grid, m.hidden_act) == (768, 1e-12, 14, "gelu")
    tiny = mae_lib.ViTMAEEncoder(mae_lib.MAEConfig.preset("fixture_small", dtype="bfloat16"), rngs=nnx.Rngs(0))
    z, g = nnx.jit(mae_lib.encode_mmfm)(tiny, jnp.zeros((2, 32, 32, 3)))
    assert z.shape == (2, 4, 48) and g.shape == (2, 48) and z.dtype == jnp.float32
    assert np.isfinite(np.asarray(z)).all()
    assert tiny.layers[0].attn.qkv.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    with pytest.raises(ValueError, match="hidden_act"):
        siglip_lib.SiglipVisionConfig.preset("fixture_small", hidden_act="relu")

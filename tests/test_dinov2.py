"""DINOv2 port: parity with transformers' Dinov2WithRegistersModel, checkpoint loading, MM-FM encode."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from mmfm_jax.convert.common import CheckpointError
from mmfm_jax.convert.dinov2 import load_dinov2
from mmfm_jax.data.preprocess import bicubic_weights
from mmfm_jax.models.dinov2 import (
    Dinov2,
    Dinov2Config,
    encode_mmfm,
    interpolate_pos_embed,
    make_encode_fn,
    make_forward_fn,
)


def regenerate_weights(spec: dict) -> dict[str, np.ndarray]:
    """The fixture's weights from its JSON: rng([SEED, i]) per row of weights_table (not stored in the npz)."""
    rules = {
        "std1": lambda w, fan: w,
        "bias_0.1": lambda w, fan: 0.1 * w,
        "norm_bias": lambda w, fan: 0.1 * w,
        "norm_weight": lambda w, fan: 1.0 + 0.1 * w,
        "layerscale": lambda w, fan: 1.0 + 0.1 * w,
        "lecun_fan_in": lambda w, fan: w * np.sqrt(1.0 / fan),
    }
    out = {}
    for i, (key, shape, _dtype, rule) in enumerate(spec["weights_table"]):
        assert rule in rules, rule
        w = np.random.default_rng([spec["SEED"], i]).standard_normal(tuple(shape), dtype=np.float64)
        out[key] = rules[rule](w, int(np.prod(shape[1:]))).astype(np.float32)
    return out


def hf_config_json(spec: dict) -> dict:
    return dict(spec["config"], model_type="dinov2_with_registers", architectures=["Dinov2WithRegistersModel"])


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    spec = json.loads((fixtures_dir / "dinov2_reg_small.json").read_text())
    with np.load(fixtures_dir / "dinov2_reg_small.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return spec, arrays


@pytest.fixture(scope="module")
def ckpt_dir(fixture, tmp_path_factory):
    spec, _ = fixture
    d = tmp_path_factory.mktemp("dinov2_reg_small")
    (d / "config.json").write_text(json.dumps(hf_config_json(spec)))
    save_file(regenerate_weights(spec), str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return load_dinov2(ckpt_dir)


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_parity_with_transformers(fixture, model, ckpt_dir, impl):
    spec, a = fixture
    if impl != "auto":
        model = load_dinov2(ckpt_dir, config=dataclasses.replace(model.config, attention_impl=impl))
    assert model.config.hidden_size == 48 and model.config.num_register_tokens == 4 and model.config.antialias
    pixels = jnp.asarray(a["input/pixel_values"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    with jax.default_matmul_precision("highest"):
        pos = np.asarray(model.pos_embed((16, 16)))
        emb = np.asarray(nnx.jit(lambda m, x: m.embed(x))(model, pixels))
        out = np.asarray(make_forward_fn(model)(pixels))
        out_na = np.asarray(make_forward_fn(model, final_affine=False)(pixels))
    errs = {
        "pos": np.abs(pos - a["intermediate/pos_embed_16x16"]).max(),
        "embeddings": np.abs(emb - a["intermediate/embeddings_out"]).max(),
        "last_hidden_state": np.abs(out - a["output/last_hidden_state"]).max(),
        "noaffine": np.abs(out_na - a["output/last_hidden_state_noaffine"]).max(),
    }
    print(f"dinov2 parity ({impl}) max abs:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert errs["pos"] < 1e-5 and errs["embeddings"] < 1e-5
    assert errs["last_hidden_state"] < 1e-5 and errs["noaffine"] < 1e-5
    # the cache is what the forward uses; computing it afresh gives the same table
    fresh = interpolate_pos_embed(model.position_embeddings[...], (16, 16), antialias=True)
    np.testing.assert_allclose(np.asarray(fresh), pos, atol=1e-6)


def test_pos_embed_matches_jax_antialiased_resize(model, fixture):
    _, a = fixture
    grid = np.asarray(model.position_embeddings[...])[0, 1:].reshape(37, 37, 48)
    ref = jax.image.resize(jnp.asarray(grid), (16, 16, 48), "bicubic", antialias=True)
    ours = np.asarray(model.pos_embed((16, 16)))[0, 1:].reshape(16, 16, 48)
    assert np.abs(ours - np.asarray(ref)).max() < 2e-6
    # plain Dinov2Model resizes without antialias: a different table (the fixture's is the antialiased one)
    plain = np.asarray(interpolate_pos_embed(model.position_embeddings[...], (16, 16), antialias=False))
    assert np.abs(plain - a["intermediate/pos_embed_16x16"]).max() > 0.1
    # the pretrained grid is used as is at 518 px
    assert np.array_equal(np.asarray(model.pos_embed((37, 37))), np.asarray(model.position_embeddings[...]))


def test_encode_mmfm_tokens_and_stats(fixture, model):
    _, a = fixture
    pixels = jnp.asarray(a["input/pixel_values"].transpose(0, 2, 3, 1))
    lat_nchw = a["output/latent_nchw_noaffine"]  # [B, C, 16, 16], no stats applied
    var = np.random.default_rng(0).uniform(0.5, 2.0, (48, 16, 16)).astype(np.float32)
    mean = np.random.default_rng(1).normal(size=(48, 16, 16)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        z, cls = make_encode_fn(model)(pixels)
        zm, cls_m = make_encode_fn(model, stats_var=var, stats_mean=mean)(pixels)
    assert z.shape == (2, 256, 48) and cls.shape == (2, 48)
    ours_nchw = np.asarray(z).transpose(0, 2, 1).reshape(2, 48, 16, 16)  # tokens-last row-major -> official
    assert np.abs(ours_nchw - lat_nchw).max() < 1e-5
    assert np.abs(np.asarray(cls) - a["output/cls_noaffine"]).max() < 1e-5
    expect_m = (lat_nchw - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.asarray(zm).transpose(0, 2, 1).reshape(2, 48, 16, 16), expect_m, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(cls_m), np.asarray(cls))  # CLS is not normalised
    # statistics in our [L, C] layout: the same normalisation (applied to the latent above)
    zv_ours = (np.asarray(z) - mean.reshape(48, 256).T) / np.sqrt(var.reshape(48, 256).T + 1e-5)
    np.testing.assert_allclose(zv_ours, np.asarray(zm), atol=2e-5)
    z2, _ = make_encode_fn(model, stats_var=var.reshape(48, 256).T, stats_mean=mean.reshape(48, 256).T)(pixels)
    np.testing.assert_allclose(np.asarray(z2), np.asarray(zm), atol=1e-6)
    with pytest.raises(ValueError, match="stats_var"):
        encode_mmfm(model, pixels, stats_var=np.ones((48, 8, 8), np.float32))


def test_load_errors_name_the_key(fixture, tmp_path):
    spec, _ = fixture
    w = regenerate_weights(spec)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json(spec)))
    bad = dict(w)
    bad["encoder.layer.1.mlp.fc1.weight"] = bad["encoder.layer.1.mlp.fc1.weight"][:10]
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.mlp\.fc1\.weight.*shape"):
        load_dinov2(tmp_path)
    missing = {k: v for k, v in w.items() if k != "encoder.layer.0.layer_scale2.lambda1"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key 'encoder\.layer\.0\.layer_scale2\.lambda1'"):
        load_dinov2(tmp_path)
    extra = dict(w, **{"encoder.layer.2.norm1.weight": np.ones(48, np.float32)})
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['encoder\.layer\.2\.norm1\.weight'\]"):
        load_dinov2(tmp_path)
    with pytest.raises(CheckpointError, match="neither a local directory"):
        load_dinov2(tmp_path / "nope")


def test_plain_dinov2_and_renamed_keys(fixture, tmp_path):
    """A Dinov2Model checkpoint (no registers, transformers 5.x key names) loads and uses the non-AA resize."""
    spec, a = fixture
    w = regenerate_weights(spec)
    w.pop("embeddings.register_tokens")
    ren = {}
    for k, v in w.items():
        for old, new in (("attention.attention.query", "attention.q_proj"), ("attention.attention.key",
                          "attention.k_proj"), ("attention.attention.value", "attention.v_proj"),
                         ("attention.output.dense", "attention.o_proj")):
            k = k.replace(old, new)
        ren[k] = v
    cfg = dict(spec["config"], model_type="dinov2")
    cfg.pop("num_register_tokens")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(ren, str(tmp_path / "model.safetensors"))
    m = load_dinov2(tmp_path, dtype="float32")
    assert m.config.num_register_tokens == 0 and not m.config.antialias and m.register_tokens is None
    pixels = jnp.asarray(a["input/pixel_values"][:1].transpose(0, 2, 3, 1))
    with jax.default_matmul_precision("highest"):
        out = np.asarray(make_forward_fn(m)(pixels))
    assert out.shape == (1, 257, 48)
    # same position-embedding recipe as transformers' Dinov2Model: plain bicubic of the 37x37 grid
    grid = regenerate_weights(spec)["embeddings.position_embeddings"][0, 1:].reshape(37, 37, 48).astype(np.float64)
    wm = bicubic_weights(37, 16, antialias=False)
    expect = np.einsum("oh,hwd,pw->opd", wm, grid, wm).reshape(256, 48)
    assert np.abs(np.asarray(m.pos_embed((16, 16)))[0, 1:] - expect).max() < 1e-5


def test_presets_bf16_and_sharding_names():
    cfg = Dinov2Config.preset("base")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (768, 12, 12)
    assert cfg.num_register_tokens == 4
    assert cfg.pretrained_grid == 37 and cfg.mlp_hidden == 3072
    assert Dinov2Config.preset("giant").mlp_hidden == 4096
    assert Dinov2Config.preset("large", num_register_tokens=0).num_register_tokens == 0
    tiny = Dinov2Config.preset("fixture_small", num_hidden_layers=1, image_size=56, dtype="bfloat16")
    m = Dinov2(tiny, rngs=nnx.Rngs(0))
    out = make_forward_fn(m)(jnp.zeros((2, 28, 42, 3)))
    assert out.shape == (2, 1 + 4 + 6, 48) and out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    names = m.layers[0].qkv.kernel.get_metadata()["out_sharding"]
    assert names == ("embed", "heads")
    assert m.position_embeddings.get_metadata()["out_sharding"] == (None, None, "embed")

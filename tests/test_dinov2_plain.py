"""DINOv2 port: parity with transformers' plain ``Dinov2Model`` (no registers, non-antialiased position resize).

Fixture: tests/fixtures/dinov2_plain_small.{npz,json}, made by tests/fixtures/make_dinov2_plain_small.py.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from mmfm_jax.convert.dinov2 import load_dinov2
from mmfm_jax.models.dinov2 import interpolate_pos_embed, make_forward_fn

TOL = 1e-5  # max abs error relative to the reference's max abs value


def pixel_values(u8: np.ndarray, spec: dict) -> np.ndarray:
    """The generator's ImageNet normalisation (float32 numpy, elementwise): uint8 [B, 3, H, W] -> float32."""
    assert "(u8.astype(float32) / float32(255) - mean) / std" in spec["inputs"]["pixel_values"]
    mean = np.asarray([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    return (u8.astype(np.float32) / np.float32(255.0) - mean) / std


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    spec = json.loads((fixtures_dir / "dinov2_plain_small.json").read_text())
    with np.load(fixtures_dir / "dinov2_plain_small.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return spec, arrays


@pytest.fixture(scope="module")
def ckpt_dir(fixture, tmp_path_factory):
    """config.json + model.safetensors as on the hub (float32, transformers 4.x key names)."""
    spec, a = fixture
    d = tmp_path_factory.mktemp("dinov2_plain_small")
    (d / "config.json").write_text(json.dumps(spec["hf_config_json"]))
    weights = {k[len("param/"):]: v.astype(np.float32) for k, v in a.items() if k.startswith("param/")}
    assert list(weights) == [row[0] for row in spec["weights_table"]]
    save_file(weights, str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return load_dinov2(ckpt_dir)


def test_loader_detects_plain_variant(model, fixture):
    spec, _ = fixture
    assert spec["hf_config_json"]["model_type"] == "dinov2"
    cfg = model.config
    assert cfg.num_register_tokens == 0 and model.register_tokens is None
    assert not cfg.antialias  # plain Dinov2Model: bicubic without antialias
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.pretrained_grid) == (48, 2, 4, 37)
    assert cfg.layer_norm_eps == 1e-6 and cfg.mlp_hidden == 192 and not cfg.use_swiglu_ffn


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_parity_with_transformers(model, ckpt_dir, fixture, impl):
    spec, a = fixture
    if impl != "auto":
        model = load_dinov2(ckpt_dir, config=dataclasses.replace(model.config, attention_impl=impl))
    px = pixel_values(a["input/pixel_uint8"], spec)
    np.testing.assert_array_equal(px[:, :, 0, :], a["input/pixel_values_row0"])
    pixels = jnp.asarray(px.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    with jax.default_matmul_precision("highest"):
        pos = np.asarray(model.pos_embed((16, 16)))
        out = np.asarray(make_forward_fn(model)(pixels))
        out_na = np.asarray(make_forward_fn(model, final_affine=False)(pixels))
    errs = {
        "pos_embed_16x16": rel_err(pos, a["intermediate/pos_embed_16x16"]),
        "last_hidden_state": rel_err(out, a["output/last_hidden_state"]),
        "noaffine": rel_err(out_na, a["output/last_hidden_state_noaffine"]),
    }
    print(f"dinov2 plain parity ({impl}), max abs err / max abs ref:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert out.shape == (2, 257, 48)
    assert all(v < TOL for v in errs.values()), errs
    # the antialiased (register-model) table would be far off: the test tells the two recipes apart
    aa = np.asarray(interpolate_pos_embed(model.position_embeddings[...], (16, 16), antialias=True))
    assert rel_err(aa, a["intermediate/pos_embed_16x16"]) > 0.1
    # at the pretrained 518 px grid the table is used as is (as transformers does)
    assert np.array_equal(np.asarray(model.pos_embed((37, 37))), np.asarray(model.position_embeddings[...]))

"""FID Inception: parity with pytorch-fid (fixture inception_fid), the two input paths, converter, and data-parallel
feature extraction (8 devices == 1 device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fid_fixture import inception_arrays, inception_state_dict, nhwc_u8
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.convert.common import CheckpointError
from mmfm_jax.convert.inception import load_inception
from mmfm_jax.eval.features import extract_features
from mmfm_jax.eval.resize import adm_inputs, pytorch_fid_inputs, resize_bilinear

TOL = dict(atol=2e-5, rtol=1e-4)  # the fixture's tolerance hint; wrong variants move pool3 by 3e-4..7e-4


@pytest.fixture(scope="module")
def model():
    return load_inception(inception_state_dict())


@pytest.fixture(scope="module")
def forward(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_intermediates=True))
    return lambda x: jax.tree.map(np.asarray, fn(state, jnp.asarray(x)))


def _u8(key: str) -> np.ndarray:
    return nhwc_u8(inception_arrays()[key])


def test_parity_299(forward):
    a = inception_arrays()
    x = _u8("input/images_299_uint8")
    # pytorch-fid: x / 255 (float32), the 299 -> 299 resize is the identity, then 2x - 1
    np.testing.assert_allclose(np.asarray(pytorch_fid_inputs(jnp.asarray(x))),
                               2 * (x.astype(np.float32) / np.float32(255)) - 1, atol=2e-7, rtol=0)
    with jax.default_matmul_precision("highest"):
        out = forward(pytorch_fid_inputs(jnp.asarray(x)))
    np.testing.assert_allclose(out["pool"], a["output/pool3_299"], **TOL)
    np.testing.assert_allclose(out["logits"], a["output/logits_299"], **TOL)
    np.testing.assert_allclose(out["logits_nobias"], a["output/logits_nobias_299"], **TOL)
    np.testing.assert_allclose(out["spatial"], a["output/sfid_spatial_299"], **TOL)
    np.testing.assert_allclose(out["mixed_6_conv"], a["intermediate/mixed_6_conv"].transpose(0, 2, 3, 1), **TOL)
    names = [k.split("/")[-1] for k in a if k.startswith("intermediate/spatial_mean_299/")]
    assert len(names) == 16
    for name in names:
        np.testing.assert_allclose(out[f"spatial_mean/{name}"], a[f"intermediate/spatial_mean_299/{name}"], **TOL)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023) and out["logits"].shape == (2, 1008)
    rel = np.abs(out["pool"] - a["output/pool3_299"]).max() / np.abs(a["output/pool3_299"]).max()
    assert rel < 1e-5, rel


def test_parity_256_pytorch_fid_path(forward):
    a = inception_arrays()
    x = jnp.asarray(_u8("input/images_256_uint8"))
    resized = np.asarray(resize_bilinear(x.astype(jnp.float32) / 255.0, (299, 299), half_pixel_centers=True))
    rows = [0, 1, 2, 148, 149, 150, 296, 297, 298]
    np.testing.assert_allclose(resized[:, rows], a["intermediate/resized_256_to_299_rows"].transpose(0, 2, 3, 1),
                               atol=1e-6)
    np.testing.assert_allclose(resized[:, :, rows], a["intermediate/resized_256_to_299_cols"].transpose(0, 2, 3, 1),
                               atol=1e-6)
    with jax.default_matmul_precision("highest"):
        out = forward(pytorch_fid_inputs(x))
        adm = forward(adm_inputs(x))
    np.testing.assert_allclose(out["pool"], a["output/pool3_256"], **TOL)
    np.testing.assert_allclose(out["logits"], a["output/logits_256"], **TOL)
    np.testing.assert_allclose(out["logits_nobias"], a["output/logits_nobias_256"], **TOL)
    np.testing.assert_allclose(out["spatial"], a["output/sfid_spatial_256"], **TOL)
    # the ADM path (TF1 legacy resize, (x - 128) / 128) is a different, measurable preprocessing
    assert np.abs(adm["pool"] - a["output/pool3_256"]).max() > 2e-4


def _tf_legacy_resize_numpy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Per-pixel TF1 ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False), float32, NHWC."""
    img = img.astype(np.float32)
    n, h, w, c = img.shape

    def axis(in_size, out_size):
        scale = np.float32(in_size) / np.float32(out_size)
        src = np.arange(out_size).astype(np.float32) * scale
        lo = np.floor(src)
        return (np.maximum(lo, 0).astype(int), np.minimum(np.ceil(src), in_size - 1).astype(int),
                (src - lo).astype(np.float32))

    y0, y1, yl = axis(h, out_h)
    x0, x1, xl = axis(w, out_w)
    tl, tr = img[:, y0][:, :, x0], img[:, y0][:, :, x1]
    bl, br = img[:, y1][:, :, x0], img[:, y1][:, :, x1]
    xl, yl = xl[None, None, :, None], yl[None, :, None, None]
    top = tl + (tr - tl) * xl
    bottom = bl + (br - bl) * xl
    return (top + (bottom - top) * yl).astype(np.float32)


@pytest.mark.parametrize("shape", [(2, 256, 256), (1, 64, 80), (1, 512, 384)])
def test_adm_path_matches_numpy_tf_legacy_resize(shape):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    want = (_tf_legacy_resize_numpy(x, 299, 299) - np.float32(128)) / np.float32(128)
    got = np.asarray(jax.jit(adm_inputs)(jnp.asarray(x)))
    assert got.shape == (shape[0], 299, 299, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    # not the half-pixel resize
    half = np.asarray(resize_bilinear(jnp.asarray(x, jnp.float32), (299, 299), True))
    assert np.abs((half - 128) / 128 - want).max() > 1e-2


def test_adm_path_identity_at_299():
    x = np.random.default_rng(1).integers(0, 256, size=(1, 299, 299, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(adm_inputs(jnp.asarray(x))), (x.astype(np.float32) - 128) / 128,
                               atol=1e-7, rtol=0)
    np.testing.assert_allclose(_tf_legacy_resize_numpy(x, 299, 299), x.astype(np.float32))


def test_converter_is_strict():
    sd = dict(inception_state_dict())
    nbt = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(nbt) == 94
    # pytorch-fid's .pth may lack the num_batches_tracked counters: still fine
    load_inception({k: v for k, v in sd.items() if k not in nbt})
    with pytest.raises(CheckpointError, match="Mixed_6d.branch1x1.bn.running_var"):
        load_inception({k: v for k, v in sd.items() if k != "Mixed_6d.branch1x1.bn.running_var"})
    with pytest.raises(CheckpointError, match="AuxLogits.fc.weight"):
        load_inception({**sd, "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    with pytest.raises(CheckpointError, match="Mixed_7c.branch_pool.conv.weight"):
        load_inception({**sd, "Mixed_7c.branch_pool.conv.weight": np.zeros((192, 2048, 3, 3), np.float32)})


def test_extract_features_8_devices_equals_1_device(model):
    a = inception_arrays()
    x = np.concatenate([_u8("input/images_256_uint8"), 255 - _u8("input/images_256_uint8")])[:3]
    mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
    mesh8 = parallel.make_mesh((4, 2))
    one = extract_features(x, model, mesh1, batch_size=2, input_path="pytorch_fid")  # 2 + 1 (padded)
    eight = extract_features(iter([x[:1], x[1:]]), model, mesh8, batch_size=8, input_path="pytorch_fid")
    for k, dim in (("pool", 2048), ("spatial", 2023), ("logits", 1008)):
        assert one[k].shape == (3, dim) and eight[k].shape == (3, dim) and one[k].dtype == np.float32
        np.testing.assert_allclose(eight[k], one[k], atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(one["pool"][:2], a["output/pool3_256"], **TOL)
    np.testing.assert_allclose(one["logits"][:2], a["output/logits_nobias_256"], **TOL)  # bias-free logits
    np.testing.assert_allclose(one["spatial"][:2], a["output/sfid_spatial_256"], **TOL)
    with pytest.raises(ValueError, match="multiple of 8"):
        extract_features(x, model, mesh8, batch_size=4)

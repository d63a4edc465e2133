"""DiTDH: parity with the official DiTwDDTHead, parameter count, init, scan/remat/bf16/sharding, converter errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.convert.common import CheckpointError, load_state_dict
from mmfm_jax.convert.ditdh import (
    convert_ditdh_state_dict,
    ditdh_from_pure_dict,
    infer_ditdh_config,
    load_official_ditdh,
)
from mmfm_jax.models.ditdh import (
    DiTDH,
    DiTDHConfig,
    abstract_ditdh,
    ditdh_flops_per_example,
    ditdh_param_count,
)
from mmfm_jax.models.layers import Buffer, rope_2d_tables, sincos_pos_embed_2d


def make(cfg, seed=0):
    """A freshly initialised model, built under jit (eager init dispatches hundreds of tiny ops)."""
    gdef, state = nnx.split(abstract_ditdh(cfg))
    return nnx.merge(gdef, jax.jit(lambda: nnx.state(DiTDH(cfg, nnx.Rngs(seed))))())


def call(m, *args):
    return jax.jit(lambda m, *a: m(*a))(m, *args)


def tokens(x):
    """official [B, C, H, W] -> ours [B, H*W, C]."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]))


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    path = fixtures_dir / "ditdh_small.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads((fixtures_dir / "ditdh_small.json").read_text())
    sd = load_state_dict(path, prefix="param/")
    return dict(path=path, a=arrays, meta=meta, sd=sd, x=tokens(arrays["input/x"]), t=arrays["input/t"],
                y=arrays["input/y"].astype(np.int32))


def test_parity_with_official(fx):
    a, x, t, y = fx["a"], fx["x"], fx["t"], fx["y"]
    with jax.default_matmul_precision("highest"):
        main = load_official_ditdh(fx["path"], DiTDHConfig.preset("parity"), prefix="param/")
        uncond = load_official_ditdh(fx["path"], DiTDHConfig.preset("parity", use_y_conditioning=False),
                                     prefix="param/")
        guide = load_official_ditdh(fx["path"], prefix="param_guide/")  # config inferred from shapes
        v_main, v_uncond, v_guide = (np.asarray(jax.jit(lambda m, *args: m(*args))(m, x, t, yy))
                                     for m, yy in ((main, y), (uncond, None), (guide, y)))
    v_ag = v_guide + float(a["input/ag_scale"]) * (v_main - v_guide)
    errs = {}
    for name, v in (("cond", v_main), ("uncond", v_uncond), ("guide", v_guide), ("autoguidance", v_ag)):
        ref = tokens(a[f"output/velocity_{name}"])
        errs[name] = rel_err(v, ref)
        assert v.dtype == np.float32 and v.shape == ref.shape
    assert max(errs.values()) < 1e-5, errs
    # the inferred guide config is the fixture's guide config
    g = fx["meta"]["guide_config"]
    gc = guide.config
    assert (list(gc.hidden_size), list(gc.depth), list(gc.num_heads)) == (g["hidden_size"], g["depth"], g["num_heads"])
    assert (gc.in_channels, gc.input_size, gc.num_modes, gc.mlp_ratio) == (
        g["in_channels"], g["input_size"], g["num_classes"], g["mlp_ratio"])
    # unpatchified intermediate: the final layer's tokens are our output tokens
    np.testing.assert_allclose(v_main, a["intermediate/final_layer_out_tokens__cond"], rtol=0, atol=1e-5 * 6)


def test_xl_param_count_without_allocating():
    cfg = DiTDHConfig.preset("XL")  # mode-conditional: 8192-row table
    model = abstract_ditdh(cfg)
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    assert ditdh_param_count(cfg) == 846_959_828
    # the frozen pos_embed (256 x 1152) and W (256) are Buffers, not trainable Params
    assert ditdh_param_count(cfg, include_buffers=False) == 846_959_828 - 294_912 - 256
    buffers = nnx.state(model, Buffer)
    flat = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(buffers)[0]}
    assert sorted(flat.values()) == [(256,), (256, 1152)], flat


def test_official_init_and_buffers():
    cfg = DiTDHConfig.preset("tiny")
    m = make(cfg)
    x = jax.random.normal(jax.random.key(1), (2, cfg.num_tokens, cfg.in_channels))
    t = jnp.array([0.1, 0.9])
    y = jnp.array([3, 5], jnp.int32)
    out = call(m, x, t, y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(jnp.abs(out).max()) == 0.0  # adaLN and the final linear start at zero
    assert float(jnp.abs(m.blocks[0].adaLN.kernel[...]).max()) == 0.0
    np.testing.assert_array_equal(np.asarray(m.pos_embed[...]), sincos_pos_embed_2d(cfg.hidden_size[0], cfg.grid))
    assert float(jnp.abs(m.s_embedder.bias[...]).max()) == 0.0
    k = np.asarray(m.blocks[0].attn.qkv.kernel[...])
    assert np.abs(k).max() <= 1 / np.sqrt(k.shape[0]) + 1e-7  # PyTorch default Linear init
    assert 0.01 < float(jnp.std(m.y_embedder[...])) < 0.03
    # gradients flow to Params only; Buffers (pos_embed, W) are not Params
    params = nnx.state(m, nnx.Param)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not any("pos_embed" in n or "'W'" in n for n in names)
    with pytest.raises(ValueError, match="y is required"):
        m(x, t, None)
    with pytest.raises(ValueError, match="tokens-last"):
        m(x[:, :5], t, y)


def _random_tree(cfg, seed=0):
    """A pure dict for ``cfg`` with random values (numpy: no jitted init to compile)."""
    rng = np.random.default_rng(seed)
    shapes = nnx.to_pure_dict(nnx.state(abstract_ditdh(cfg)))
    return jax.tree.map(lambda v: 0.2 * rng.standard_normal(v.shape).astype(np.float32), shapes)


def test_scan_and_remat_equal_loop(fx):
    base = DiTDHConfig.preset("parity")
    x, t, y = fx["x"][:2], fx["t"][:2], fx["y"][:2]
    with jax.default_matmul_precision("highest"):
        outs, grads = {}, {}
        for scan, remat in ((False, "none"), (True, "block"), (False, "dots")):
            cfg = DiTDHConfig.preset("parity", scan_layers=scan, remat=remat)
            m = ditdh_from_pure_dict(convert_ditdh_state_dict(fx["sd"], cfg), cfg)
            gdef, state = nnx.split(m)

            @jax.jit
            def loss(state, gdef=gdef):
                return jnp.mean(nnx.merge(gdef, state)(x, t, y) ** 2)

            outs[scan, remat], g = jax.value_and_grad(loss)(state)
            g = nnx.to_pure_dict(g)
            grads[scan, remat] = np.asarray(g["final_layer"]["adaLN"]["kernel"]), np.asarray(
                g["blocks"]["attn"]["qkv"]["kernel"][1] if scan else g["blocks"][1]["attn"]["qkv"]["kernel"])
        assert base.scan_layers is False
    ref = outs[False, "none"]
    for k, v in outs.items():
        assert abs(float(v) - float(ref)) <= 1e-6 * abs(float(ref)), k
        for a, b in zip(grads[k], grads[False, "none"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


def test_bf16_close_to_fp32(fx):
    x, t, y = fx["x"], fx["t"], fx["y"]
    outs = {}
    for dt in ("float32", "bfloat16"):
        cfg = DiTDHConfig.preset("parity", dtype=dt)
        m = ditdh_from_pure_dict(convert_ditdh_state_dict(fx["sd"], cfg), cfg)
        outs[dt] = np.asarray(jax.jit(lambda m: m(x, t, y))(m))
        assert outs[dt].dtype == np.float32
    err = rel_err(outs["bfloat16"], outs["float32"])
    assert 0 < err < 3e-2, err
    # bf16 residual streams (model.residual_dtype): a speed option, close to the fp32-residual bf16 model
    cfg = DiTDHConfig.preset("parity", dtype="bfloat16", residual_dtype="bfloat16")
    m = ditdh_from_pure_dict(convert_ditdh_state_dict(fx["sd"], cfg), cfg)
    v = np.asarray(jax.jit(lambda m: m(x, t, y))(m))
    assert v.dtype == np.float32
    err_res = rel_err(v, outs["float32"])
    assert 0 < err_res < 5e-2 and not np.array_equal(v, outs["bfloat16"]), err_res
    # an unknown residual dtype fails, naming the field
    with pytest.raises(ValueError, match="residual_dtype"):
        DiTDHConfig.preset("parity", residual_dtype="float16")


def test_sharded_forward_equals_single_device(fx):
    cfg = DiTDHConfig.preset("parity", scan_layers=True)
    m = ditdh_from_pure_dict(convert_ditdh_state_dict(fx["sd"], cfg), cfg)
    gdef, state = nnx.split(m)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, cfg.num_tokens, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(size=8).astype(np.float32)
    y = rng.integers(0, cfg.num_modes, 8).astype(np.int32)

    def fwd(state, x, t, y):
        return nnx.merge(gdef, state)(x, t, y)

    with jax.default_matmul_precision("highest"):
        ref = np.asarray(jax.jit(fwd)(state, x, t, y))
        mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
        sh = parallel.state_shardings(mesh, state)
        assert sh["blocks"]["attn"]["qkv"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
        assert sh["y_embedder"].spec == jax.sharding.PartitionSpec(None, "fsdp")
        state_s = jax.device_put(state, sh)
        xs, ts, ys = (jax.device_put(a, parallel.batch_sharding(mesh, a.ndim)) for a in (x, t, y))
        out = jax.jit(fwd, out_shardings=parallel.batch_sharding(mesh, 3))(state_s, xs, ts, ys)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_converter_errors(fx):
    sd, cfg = fx["sd"], DiTDHConfig.preset("parity")
    bad = {k: v for k, v in sd.items() if k != "blocks.1.attn.proj.bias"}
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.attn\.proj\.bias'"):
        convert_ditdh_state_dict(bad, cfg)
    bad = dict(sd, **{"blocks.2.mlp.w3.weight": np.zeros((96, 255), np.float32)})
    with pytest.raises(CheckpointError, match=r"'blocks\.2\.mlp\.w3\.weight' has shape \(96, 255\), "
                                              r"expected \(96, 256\)"):
        convert_ditdh_state_dict(bad, cfg)
    bad = dict(sd, **{"blocks.3.norm1.weight": np.ones(96, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks\.3\.norm1\.weight'\]"):
        convert_ditdh_state_dict(bad, cfg)
    bad = dict(sd, **{"dec_feat_rope.freqs_sin": sd["dec_feat_rope.freqs_sin"][:, ::-1].copy()})
    with pytest.raises(CheckpointError, match="dec_feat_rope.freqs_sin.*RoPE"):
        convert_ditdh_state_dict(bad, cfg)
    with pytest.raises(CheckpointError, match="missing key 's_embedder.proj.weight'"):
        infer_ditdh_config({})
    # the unconditional variant explains (drops) the mode table; the RoPE buffers equal our tables
    tree = convert_ditdh_state_dict(sd, DiTDHConfig.preset("parity", use_y_conditioning=False))
    assert "y_embedder" not in tree
    np.testing.assert_allclose(sd["enc_feat_rope.freqs_cos"], rope_2d_tables(16, 16)[0], atol=1e-6)
    # a DDP-wrapped state dict loads too
    tree2 = convert_ditdh_state_dict({"module." + k: v for k, v in sd.items()}, cfg)
    np.testing.assert_array_equal(tree2["pos_embed"], sd["pos_embed"][0])
    assert infer_ditdh_config(sd) == cfg


def test_patch_size_two_matches_conv_and_unpatchify():
    cfg = DiTDHConfig.preset("tiny", patch_size=2, in_channels=3, input_size=8, depth=(1, 1))
    tree = _random_tree(cfg)
    m = ditdh_from_pure_dict(tree, cfg)
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)  # official [B, C, H, W]
    # official conv weight [out, C, p, p] built from our kernel by the inverse of the converter's mapping
    k = tree["s_embedder"]["kernel"]  # [p*p*C, out] in (ph, pw, c) order
    w = k.reshape(2, 2, 3, -1).transpose(3, 2, 0, 1)
    conv = np.einsum("bchpwq,ocpq->bhwo", img.reshape(2, 3, 4, 2, 4, 2), w).reshape(2, 16, -1)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(m.s_embedder(m._patchify(jnp.asarray(tokens(img)))))
    np.testing.assert_allclose(ours, conv + tree["s_embedder"]["bias"], rtol=1e-5, atol=1e-5)
    # unpatchify: official einsum 'nhwpqc->nchpwq' on per-token (p, q, c) outputs
    per_tok = rng.standard_normal((2, 16, 12)).astype(np.float32)
    official = np.einsum("nhwpqc->nchpwq", per_tok.reshape(2, 4, 4, 2, 2, 3)).reshape(2, 3, 8, 8)
    np.testing.assert_array_equal(np.asarray(m._unpatchify(jnp.asarray(per_tok))), tokens(official))
    out = call(m, jnp.asarray(tokens(img)), jnp.array([0.3, 0.7]), jnp.array([1, 2]))
    assert out.shape == (2, 64, 3)


def _dot_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (_, rc), (_, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
            total += 2.0 * np.prod(lhs) * np.prod(rhs_free)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    total += _dot_flops(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    total += _dot_flops(sub)
    return total


def test_flops_match_traced_matmuls():
    for cfg in (DiTDHConfig.preset("tiny"), DiTDHConfig.preset("tiny", hidden_size=(96, 96), use_y_conditioning=False)):
        m = abstract_ditdh(cfg)
        gdef, state = nnx.split(m)
        x = jax.ShapeDtypeStruct((1, cfg.num_tokens, cfg.in_channels), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.float32)
        y = jax.ShapeDtypeStruct((1,), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda s, x, t, y, gdef=gdef: nnx.merge(gdef, s)(x, t, y))(state, x, t, y)
        assert _dot_flops(jaxpr.jaxpr) == ditdh_flops_per_example(cfg)
    xl = ditdh_flops_per_example(DiTDHConfig.preset("XL"))
    assert 3.2e11 < xl < 3.3e11  # about 323 GFLOP per forward at 256 tokens


def test_safetensors_checkpoint_loads_like_the_npz(fx, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "ditdh.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in fx["sd"].items()}, str(path))
    with jax.default_matmul_precision("highest"):
        m = load_official_ditdh(path)  # config inferred from the shapes
        v = np.asarray(call(m, fx["x"], fx["t"], fx["y"]))
    assert m.config == DiTDHConfig.preset("parity")
    assert rel_err(v, tokens(fx["a"]["output/velocity_cond"])) < 1e-5
    # a truncated file is a clear error, not a crash or silently missing weights
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_official_ditdh(tmp_path / "cut.safetensors")

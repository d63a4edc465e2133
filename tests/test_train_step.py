"""Train step: sharded == single device, accumulation == big batch, in-step mode coupling on a K-sharded table,
schedules at their boundaries, adaptive weighting against numpy, non-finite skipping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.gmm.source import ModeSource, shard_source
from mmfm_jax.train import adaptive as ada
from mmfm_jax.train import optim
from mmfm_jax.train.state import state_initializer
from mmfm_jax.train.step import StepConfig, make_train_step, put_batch

L, C, D, K, H = 8, 4, 3, 16, 32
FAST = {"xla_backend_optimization_level": 0}  # LLVM -O0: halves CPU compile time; both sides of every comparison


class Buf(nnx.Variable):
    pass


class TinyNet(nnx.Module):
    """Stand-in with DiTDH's call signature: (x [B, L, C], t [B], y [B] | None) -> v [B, L, C]."""

    def __init__(self, rngs: nnx.Rngs, use_y: bool = False):
        init = nnx.initializers.lecun_normal()
        self.inp = nnx.Linear(C, H, kernel_init=nnx.with_partitioning(init, ("channels", "embed")), rngs=rngs)
        self.tproj = nnx.Linear(1, H, kernel_init=nnx.with_partitioning(init, (None, "embed")), rngs=rngs)
        self.out = nnx.Linear(H, C, kernel_init=nnx.with_partitioning(init, ("embed", "channels")), rngs=rngs)
        self.emb = nnx.Param(jax.random.normal(rngs.params(), (K, H)) * 0.1, sharding_names=("vocab", "embed")) \
            if use_y else None
        self.pos = Buf(jnp.linspace(-1, 1, L * H).reshape(L, H))

    def __call__(self, x, t, y=None):
        h = self.inp(x) + self.tproj(t[:, None])[:, None] + self.pos[...]
        if y is not None:
            h = h + jnp.take(self.emb[...], y, axis=0)[:, None]
        return self.out(jax.nn.gelu(h))


def _cfg(**kw):
    base = dict(grad_accum_steps=1, shift=1.5)
    base.update(kw)
    return StepConfig(**base)


def _tx(lr=1e-3):
    return optim.optimizer_from_config(_TrainCfg(lr))


class _TrainCfg:
    def __init__(self, lr):
        self.initial_lr, self.base_lr, self.final_lr = lr, lr / 2, lr / 10
        self.initial_phase_steps, self.decay_start_steps, self.decay_end_steps = 2, 3, 6
        self.schedule, self.b1, self.b2, self.eps, self.weight_decay, self.clip_grad = "linear", .9, .95, 1e-8, 0., 1.
        self.initial_ema_decay, self.ema_decay = 0.5, 0.9


def _source(seed=0):
    r = np.random.default_rng(seed)
    w = r.uniform(0.5, 1.5, K)
    gmm = DiagGMM(jnp.asarray(w / w.sum(), jnp.float32), jnp.asarray(r.normal(size=(K, D)) * 2, jnp.float32),
                  jnp.asarray(r.uniform(0.5, 1.5, (K, D)), jnp.float32))
    return ModeSource(gmm, np.asarray(r.normal(size=(K, L, C)), np.float32),
                      np.asarray(r.uniform(0.1, 0.5, K), np.float32))


def _batch(G, seed=0):
    r = np.random.default_rng(seed)
    return dict(latent=r.normal(size=(G, L, C)).astype(np.float32), cls=r.normal(size=(G, D)).astype(np.float32) * 2,
                label=(np.arange(G) % 5).astype(np.int32))


@functools.cache
def _setup(mesh_shape, ndev, cfg, use_y):
    """Compiled once per (mesh, config): ``init()`` gives a fresh state for every run (the step donates it)."""
    mesh = parallel.make_mesh(mesh_shape, jax.devices()[:ndev])
    tx, lr_fn, ema_fn = _tx()
    init, sh, mdef = state_initializer(functools.partial(TinyNet, use_y=use_y), tx, mesh, seed=3, num_modes=K,
                                       compiler_options=FAST)
    return mesh, init, make_train_step(mdef, tx, lr_fn, ema_fn, cfg, mesh, sh, compiler_options=FAST)


def _run(mesh_shape, cfg, n_steps=2, G=16, use_y=False, source=None, batches=None, ndev=8):
    mesh, init, step = _setup(mesh_shape, ndev, cfg, use_y)
    state = init()
    src = shard_source(source, mesh) if source is not None else None
    ms = []
    for i in range(n_steps):
        b = batches[i] if batches is not None else _batch(G, i)
        state, m = step(state, put_batch(b, mesh, cfg), src)
        ms.append(jax.device_get(m))
    return jax.device_get(state), ms, state


def _close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_sharded_equals_single_device_and_accumulation():
    cfg = _cfg()
    s8, m8, dev_state = _run((4, 2), cfg)
    # every leaf is a global array over the 8-device mesh; FSDP splits 'embed' over fsdp
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(dev_state))
    assert dev_state.params["inp"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert dev_state.opt_state[1][0].mu["inp"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    s1, m1, _ = _run((1, 1), cfg, ndev=1)
    for a, b in zip(m8, m1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    _close(s8.params, s1.params)
    _close(s8.ema, s1.ema)
    assert int(s8.step) == 2 and m8[0]["lr"] == pytest.approx(1e-3) and m8[1]["ema_decay"] == pytest.approx(0.5)
    # accumulation over 2 micro-batches (each spread over the 8 devices) == one big batch
    s_big, m_big, _ = _run((4, 2), cfg)
    s_acc, m_acc, _ = _run((4, 2), _cfg(grad_accum_steps=2))
    for a, b in zip(m_big, m_acc):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    _close(s_big.params, s_acc.params)


def test_mode_coupling_in_step_with_k_sharded_table():
    src = _source()
    cfg = _cfg(source_kind="gmm_mode", y_from="mode", grad_accum_steps=2,
               adaptive=ada.AdaptiveConfig(num_modes=K, warmup_steps=1, ema_decay=0.5))
    s8, m8, _ = _run((4, 2), cfg, use_y=True, source=src)
    s1, m1, _ = _run((1, 1), cfg, use_y=True, source=src, ndev=1)
    for a, b in zip(m8, m1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    _close(s8.params, s1.params, rtol=5e-5)
    _close(s8.adaptive.loss_ema, s1.adaptive.loss_ema, rtol=1e-5)
    assert int(s8.adaptive.num_updates) == 4 and float(np.sum(s8.adaptive.counts)) == 3 * 8
    # the coupled modes are the GMM posterior draws: per-example keys reproduce them outside the step
    from mmfm_jax.gmm.source import sample_source
    st = s1  # any state: rng is constant
    G = 16
    step_key = jax.random.fold_in(jnp.asarray(st.rng), 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(G, dtype=jnp.uint32))
    b = _batch(G, 0)
    z0, k = sample_source("gmm_mode", src, jnp.asarray(b["cls"]), keys, (G, L, C))
    post = np.asarray(jax.nn.softmax(__import__("mmfm_jax.gmm.diag", fromlist=["x"]).log_joint(
        src.gmm, jnp.asarray(b["cls"])), -1))
    assert np.all(post[np.arange(G), np.asarray(k)] > 1e-6)
    # gmm_indep and the label-conditioned Gaussian run too
    # gmm_indep and the label-conditioned Gaussian trace (shapes and plumbing; not compiled, to save time)
    for c, use_y, s in ((_cfg(source_kind="gmm_indep"), False, src), (_cfg(y_from="label"), True, None)):
        mesh, init, step = _setup((4, 2), 8, c, use_y)
        src_s = shard_source(s, mesh) if s is not None else None
        out = jax.eval_shape(step, jax.eval_shape(init), put_batch(_batch(16), mesh, c), src_s)
        assert out[1]["loss"].shape == ()


def test_nonfinite_steps_are_skipped():
    cfg = _cfg()
    good = [_batch(16, i) for i in range(4)]
    bad = dict(good[1], latent=np.full_like(good[1]["latent"], np.nan))
    s, ms, _ = _run((4, 2), cfg, n_steps=4, batches=[good[0], bad, bad, good[3]])
    assert [m["skipped"] for m in ms] == [0, 1, 1, 0]
    assert [m["nonfinite_streak"] for m in ms] == [0, 1, 2, 0]
    assert int(s.skipped) == 2 and int(s.step) == 4 and int(s.opt_state[1][0].count) == 2
    # a skipped step leaves params, EMA, optimizer state unchanged
    s2, _, _ = _run((4, 2), cfg, n_steps=2, batches=[good[0], bad])
    s1, _, _ = _run((4, 2), cfg, n_steps=1, batches=[good[0]])
    for a, b in ((s2.params, s1.params), (s2.ema, s1.ema), (s2.opt_state, s1.opt_state)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)


def test_nonfinite_cls_is_skipped_under_mode_coupling():
    """A NaN or +-Inf [CLS] would couple to mode 0 (or 1) with a finite loss: the step is skipped and counted like a
    non-finite latent instead."""
    src = _source()
    cfg = _cfg(source_kind="gmm_mode", y_from="mode")
    good = [_batch(16, i) for i in range(4)]
    bad = [dict(good[i], cls=good[i]["cls"].copy()) for i in (1, 2)]
    bad[0]["cls"][3, 0] = np.nan
    bad[1]["cls"][5, 2] = -np.inf
    s, ms, _ = _run((4, 2), cfg, n_steps=4, use_y=True, source=src, batches=[good[0], *bad, good[3]])
    assert [m["skipped"] for m in ms] == [0, 1, 1, 0] and int(s.skipped) == 2
    assert int(s.opt_state[1][0].count) == 2


def test_schedules_at_boundaries():
    lr = optim.lr_schedule(4e-4, 2e-4, 2e-5, 25_020, 50_040, 1_000_800)
    for step, want in ((0, 4e-4), (25_019, 4e-4), (25_020, 2e-4), (50_039, 2e-4), (50_040, 2e-4),
                       (100_000, 2e-4 - 1.8e-4 * (100_000 - 50_040) / 950_760), (1_000_800, 2e-5), (2_000_000, 2e-5)):
        assert float(lr(step)) == pytest.approx(want, rel=1e-5), step
    assert float(lr(100_000)) == pytest.approx(1.9054e-4, rel=1e-4)  # spec: ~1.905e-4 at 100k
    cos = optim.lr_schedule(2e-4, 2e-4, 2e-5, 0, 10, 20, "cosine")
    assert float(cos(15)) == pytest.approx(2e-5 + 1.8e-4 * 0.5, rel=1e-5)
    assert optim.epochs_to_steps(20, 1251) == 25_020 and optim.epochs_to_steps(800, 1251) == 1_000_800
    ema = optim.ema_decay_schedule(0.999, 0.9995, 25_020)
    assert float(ema(25_019)) == pytest.approx(0.999) and float(ema(25_020)) == pytest.approx(0.9995)
    # torch-style clipping: g * min(1, max / (norm + 1e-6))
    g = {"a": jnp.array([3.0, 4.0])}
    out, _ = optim.clip_by_global_norm_torch(1.0).update(g, None)
    np.testing.assert_allclose(out["a"], np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-6)


def _numpy_weighter(cfg, batches):
    """Direct numpy transcription of the reference AdaptiveClassWeighter (weights before each update)."""
    ema, ws, wc, step, out = np.ones(cfg.num_modes), np.zeros(cfg.num_modes), np.zeros(cfg.num_modes), 0, []
    for k, loss in batches:
        if step <= cfg.warmup_steps:
            w = np.ones(len(k))
        else:
            cw = (ema / (ema.mean() + 1e-8)) ** cfg.gamma
            cw = np.clip(cw / (cw.mean() + 1e-8), cfg.min_weight, cfg.max_weight)
            w = cw[k]
        out.append(w)
        step += 1
        s, c = np.bincount(k, loss, cfg.num_modes), np.bincount(k, None, cfg.num_modes)
        if step <= cfg.warmup_steps:
            ws += s
            wc += c
            if step == cfg.warmup_steps:
                ema = np.where(wc > 0, ws / np.maximum(wc, 1), ema)
        else:
            ema = np.where(c > 0, cfg.ema_decay * ema + (1 - cfg.ema_decay) * s / np.maximum(c, 1), ema)
    return out, ema


def test_adaptive_weighting_matches_numpy():
    cfg = ada.AdaptiveConfig(num_modes=12, warmup_steps=3, ema_decay=0.9, min_weight=0.3, max_weight=3.0)
    r = np.random.default_rng(0)
    batches = [(r.integers(0, 12, 10), r.gamma(2.0, 1.0 + np.arange(10) % 3)) for _ in range(9)]
    want_w, want_ema = _numpy_weighter(cfg, batches)
    st = ada.init_adaptive(12)
    upd = jax.jit(lambda s, k, x: ada.update(s, cfg, k, x))
    for (k, loss), w in zip(batches, want_w):
        got = ada.sample_weights(st, cfg, jnp.asarray(k))
        np.testing.assert_allclose(got, w, rtol=1e-5)
        st = upd(st, jnp.asarray(k), jnp.asarray(loss, jnp.float32))
    np.testing.assert_allclose(st.loss_ema, want_ema, rtol=1e-5)
    assert any(not np.allclose(w, 1) for w in want_w)  # the test reaches the weighted regime


def test_compiler_options_auto_per_backend():
    from mmfm_jax.utils import AUTO_COMPILER_OPTIONS, parse_compiler_options

    assert parse_compiler_options("auto", backend="cpu") == {}
    assert parse_compiler_options("auto", backend="gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert AUTO_COMPILER_OPTIONS["gpu"] == {"xla_gpu_enable_triton_gemm": False}
    # explicit items override what auto adds, in either order
    for spec in ("auto,xla_gpu_enable_triton_gemm=true", "xla_gpu_enable_triton_gemm=true,auto"):
        assert parse_compiler_options(spec, backend="gpu") == {"xla_gpu_enable_triton_gemm": True}
    assert parse_compiler_options("auto,xla_backend_optimization_level=0", backend="cpu") == {
        "xla_backend_optimization_level": 0}
    assert parse_compiler_options("") == {}
    with pytest.raises(ValueError, match="expected name=value or 'auto'"):
        parse_compiler_options("fast")


def test_adam_mu_dtype_and_memory_options_are_validated(repo_dir):
    import ml_collections
    import optax

    from mmfm_jax.config_files import load_config
    from mmfm_jax.config_utils import ConfigError
    from mmfm_jax.jobs import train as train_job

    t = ml_collections.ConfigDict(dict(initial_lr=1e-3, base_lr=1e-3, final_lr=1e-3, initial_phase_steps=0,
                                       decay_start_steps=0, decay_end_steps=1, schedule="linear", b1=0.9, b2=0.95,
                                       eps=1e-8, weight_decay=0.0, clip_grad=1.0, initial_ema_decay=0.9,
                                       ema_decay=0.9, adam_mu_dtype="bfloat16"))
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx, _, _ = optim.optimizer_from_config(t)
    adam = next(s for s in jax.tree.leaves(tx.init(params), is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))
    assert {a.dtype for a in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    g = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}
    upd, _ = tx.update(g, tx.init(params), params)
    t32 = ml_collections.ConfigDict(t.to_dict())
    t32.adam_mu_dtype = "float32"
    tx32, _, _ = optim.optimizer_from_config(t32)
    upd32, _ = tx32.update(g, tx32.init(params), params)
    for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd32)):  # first step: bf16 rounding of mu only
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-2)
    for key, bad in (("train.adam_mu_dtype", "float16"), ("source.table_dtype", "int8")):
        cfg = load_config(f"{repo_dir}/configs/train.py:tiny", {key: bad})
        with pytest.raises(ConfigError, match=f"config.{key}"):
            train_job.validate(cfg)


def test_config_changes_on_resume_are_listed():
    from mmfm_jax.train.config import config_changes

    saved = {"train": {"base_lr": 2e-4, "depth": [28, 2], "num_steps": 4}, "seed": 0, "old": 1}
    now = {"train": {"base_lr": 1e-4, "depth": (28, 2), "num_steps": 4}, "seed": 0, "new": True}
    assert config_changes(saved, now) == ["new: '<absent>' -> True", "old: 1 -> '<absent>'",
                                          "train.base_lr: 0.0002 -> 0.0001"]  # JSON lists equal tuples
    assert config_changes(None, now) == []


def test_labels_out_of_range_stop_with_a_clear_error(repo_dir, tmp_path):
    from mmfm_jax.cli import run_job
    from mmfm_jax.config_files import load_config

    # the synthetic latents' labels go up to 9: a 4-row label table must not be indexed out of range (jnp.take
    # would clip or give NaN, and a label of -1 would read the last row)
    cfg = load_config(f"{repo_dir}/configs/train.py:tiny", {
        "data.kind": "synthetic", "source.kind": "gaussian", "source.y_from": "label", "model.num_modes": 4,
        "model.use_y_conditioning": True, "adaptive.enabled": False, "train.num_steps": 2})
    with pytest.raises(ValueError, match=r"labels in \[\d+, 9\], outside \[0, 4\)"):
        run_job("train", cfg, tmp_path / "w")
    assert not any((tmp_path / "w" / "checkpoints").glob("[0-9]*"))  # stopped before any update


@pytest.mark.parametrize("dtype,rtol", [("float32", 2e-5), ("bfloat16", 2e-2)])
def test_ditdh_step_sharded_equals_single_device(dtype, rtol):
    """The real model (tiny DiTDH, mode-conditional, GMM source + mode coupling) on 8 devices with FSDP == 1 device."""
    from mmfm_jax.models.ditdh import DiTDH, DiTDHConfig

    mcfg = DiTDHConfig.preset("tiny", input_size=4, in_channels=C, num_modes=K, dtype=dtype)
    lat = mcfg.input_size ** 2
    r = np.random.default_rng(7)
    src = ModeSource(_source().gmm, np.asarray(r.normal(size=(K, lat, C)), np.float32),
                     np.asarray(r.uniform(0.1, 0.5, K), np.float32))
    batch = dict(latent=r.normal(size=(16, lat, C)).astype(np.float32),
                 cls=r.normal(size=(16, D)).astype(np.float32) * 2, label=np.zeros(16, np.int32))
    cfg = _cfg(source_kind="gmm_mode", y_from="mode")
    out = {}
    for shape, ndev in (((4, 2), 8), ((1, 1), 1)):
        mesh = parallel.make_mesh(shape, jax.devices()[:ndev])
        tx, lr_fn, ema_fn = _tx()
        init, sh, mdef = state_initializer(lambda rr: DiTDH(mcfg, rr), tx, mesh, seed=3, num_modes=K,
                                           compiler_options=FAST)
        step = make_train_step(mdef, tx, lr_fn, ema_fn, cfg, mesh, sh, compiler_options=FAST)
        state, m = step(init(), put_batch(batch, mesh, cfg), shard_source(src, mesh))
        out[ndev] = jax.device_get((state.params, m))
    (p8, m8), (p1, m1) = out[8], out[1]
    assert np.isfinite(m8["loss"]) and m8["loss"] > 0
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=rtol)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=rtol)
    _close(p8, p1, rtol=rtol, atol=rtol * 1e-2)


def test_config_errors_maps_fields_to_keys(repo_dir):
    from mmfm_jax.config_files import load_config
    from mmfm_jax.config_utils import ConfigError, config_errors

    cfg = load_config(f"{repo_dir}/configs/train.py:tiny_gm", {"train.gm_trans_ratio": 0.25})
    with pytest.raises(ConfigError, match=r"^config\.train\.gm_trans_ratio = 0\.25: in \(0, 1\]$"):
        with config_errors(cfg, "train", {"trans_ratio": "train.gm_trans_ratio"}):
            raise ValueError("trans_ratio = 0.5: in (0, 1]")  # the config's value is shown
    with pytest.raises(ConfigError, match=r"^config\.model\.depth: too deep$"):
        with config_errors(cfg, "model"):
            raise TypeError("DiTDHConfig.depth: too deep")
    with pytest.raises(ConfigError, match=r"^config\.model: unknown preset 'Q'$"):  # not a field of config.model
        with config_errors(cfg, "model"):
            raise ValueError("unknown preset 'Q'")

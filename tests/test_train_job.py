"""The train job end to end (tiny DiTDH, GMM source with mode coupling, mode-conditional, adaptive weighting):
SIGTERM + kill -9 + resume is bitwise an uninterrupted run; corrupt latest checkpoint; restore onto 1 and 2
devices; 2 processes x 4 devices; non-finite stop."""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = f"{REPO}/configs/train.py:tiny"
K = 8


def overrides(source: str, num_steps: int = 6, **extra) -> dict:
    """The config of these tests: tiny DiTDH on synthetic latents, GMM source + mode coupling, model sees k."""
    o = {"model.use_y_conditioning": True, "model.num_modes": K, "source.kind": "gmm_mode", "source.path": source,
         "source.y_from": "mode", "adaptive.enabled": True, "train.num_steps": num_steps, "mesh.fsdp": 2}
    o.update(extra)
    return o


def _make_source(path: Path) -> None:
    import jax.numpy as jnp

    from mmfm_jax.gmm.diag import DiagGMM
    from mmfm_jax.gmm.source import ModeSource, save_source

    r = np.random.default_rng(0)
    gmm = DiagGMM(jnp.full((K,), 1.0 / K, jnp.float32), jnp.asarray(r.normal(size=(K, 4)), jnp.float32),
                  jnp.ones((K, 4), jnp.float32))
    save_source(path, ModeSource(gmm, jnp.asarray(r.normal(size=(K, 16, 4)), jnp.float32),
                                 jnp.full((K,), 0.5, jnp.float32)))


def _cfg(source, **kw):
    from mmfm_jax.config_files import load_config

    return load_config(CONFIG, overrides(str(source), **kw))


def _state(workdir: Path, cfg, step=None):
    """The saved train state of ``workdir`` (newest or ``step``), restored onto one device, as numpy."""
    import jax

    from mmfm_jax import parallel
    from mmfm_jax.models.ditdh import DiTDH
    from mmfm_jax.train.checkpoint import Checkpointer
    from mmfm_jax.train.config import model_config
    from mmfm_jax.train.optim import optimizer_from_config
    from mmfm_jax.train.state import abstract_train_state

    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    tx, _, _ = optimizer_from_config(cfg.train)
    mcfg = model_config(cfg)
    target, _, _ = abstract_train_state(lambda r: DiTDH(mcfg, r), tx, mesh, cfg.seed, K)
    ck = Checkpointer(workdir / "checkpoints")
    r = ck.restore(target) if step is None else ck._restore_step(step, target, None, False)[0]
    state = r.state if step is None else r
    return jax.device_get(state)


def _assert_same(a, b, exact=True, rtol=1e-5):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if exact:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6)


_BASE: dict = {}


def _baseline(tmp_path_factory):
    """Uninterrupted 6-step run on 8 devices (data 4 x fsdp 2), in this process; shared by the tests."""
    if not _BASE:
        from mmfm_jax.cli import run_job

        root = tmp_path_factory.mktemp("train_job")
        _make_source(root / "source")
        summary = run_job("train", _cfg(root / "source"), root / "base")
        _BASE.update(root=root, source=root / "source", workdir=root / "base", summary=summary)
    return _BASE


def _env(root: Path, devices: int = 8) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), MMFM_NO_PROGRESS="1",
                JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                TF_CPP_MIN_LOG_LEVEL="3")


def _cli(workdir: Path, source: Path, extra: dict, hooks: tuple[str, ...] = ()) -> list[str]:
    """``mmfm-jax train`` through ``tests/train_hooks.py`` (``hooks``: e.g. ``--hang-at=5``)."""
    flags = [f"--config.{k}={v}" for k, v in overrides(str(source), **extra).items()]
    return [sys.executable, "-m", "tests.train_hooks", *hooks, "train", f"--config={CONFIG}", f"--workdir={workdir}",
            *flags]


def _start_and_wait_for_hang(cmd, env, log: Path, step: int) -> subprocess.Popen:
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    watchdog = threading.Timer(240, p.kill)
    watchdog.start()
    for line in p.stdout:
        if f"DEBUG: hanging at step {step}" in line:
            break
    watchdog.cancel()
    assert p.poll() is None, f"train subprocess exited early:\n{log.read_text()[-3000:]}"
    return p


def test_sigterm_kill9_resume_is_bitwise(tmp_path_factory):
    from train_hooks import sigterm_at

    from mmfm_jax.cli import run_job

    base = _baseline(tmp_path_factory)
    assert base["summary"]["final_step"] == 6 and base["summary"]["checkpoints"] == [4, 6]
    assert base["summary"]["source"] == "gmm_mode" and base["summary"]["y_from"] == "mode"
    root, wd = base["root"], base["root"] / "killed"
    # 1) fresh run; a real SIGTERM at step 3 -> checkpoint 3 at the step boundary, clean return
    s1 = run_job("train", _cfg(base["source"]), wd, callbacks=[sigterm_at(3)])
    assert s1["preempted"] and s1["final_step"] == 3 and s1["checkpoints"] == [2, 3]
    # 2) another process resumes from 3 and is killed (SIGKILL) while at step 5 (step 4 saved, 5 not)
    p = _start_and_wait_for_hang(_cli(wd, base["source"], {}, ("--hang-at=5",)), _env(root),
                                 root / "p2.log", 5)
    p.kill()
    p.wait(timeout=60)
    assert sorted(int(d.name) for d in (wd / "checkpoints").iterdir() if d.name.isdigit()) == [3, 4]
    # kill -9 lost no metric logged before the committed checkpoint 4 (TensorBoard is flushed at each save)
    got = _tb_scalars(wd / "tb")
    for k in ("loss", "grad_norm", "lr", "skipped_total", "images_per_s", "mfu"):
        assert 4 in [st for st, _ in got.get(f"train/{k}", [])], (k, got.get(f"train/{k}"))
    # 3) resume from 4 to the end: bitwise the uninterrupted run (params, EMA, optimizer, adaptive, counters)
    s3 = run_job("train", _cfg(base["source"]), wd)
    assert s3["resumed_from"] == 4 and s3["final_step"] == 6 and s3["fallback_from"] is None
    cfg = _cfg(base["source"])
    _assert_same(_state(wd, cfg), _state(base["workdir"], cfg), exact=True)


def test_corrupt_latest_checkpoint_falls_back(tmp_path_factory):
    from mmfm_jax.cli import run_job

    base = _baseline(tmp_path_factory)
    wd = base["root"] / "corrupt"
    shutil.copytree(base["workdir"], wd)
    data = sorted((wd / "checkpoints" / "6" / "state" / "d").iterdir(), key=lambda p: -p.stat().st_size)[0]
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 3)
    s = run_job("train", _cfg(base["source"]), wd)
    assert s["resumed_from"] == 4 and s["fallback_from"] == 6 and s["final_step"] == 6
    assert any((wd / "checkpoints_corrupt").iterdir())
    cfg = _cfg(base["source"])
    _assert_same(_state(wd, cfg), _state(base["workdir"], cfg), exact=True)


def test_nonfinite_steps_stop_the_run(tmp_path_factory):
    import pytest

    from mmfm_jax.cli import run_job
    from mmfm_jax.data.synthetic import synthetic_latents
    from mmfm_jax.train.trainer import NonFiniteError

    base = _baseline(tmp_path_factory)
    cfg = _cfg(base["source"])
    nan = synthetic_latents(cfg.seed + 12345, cfg.data.synthetic_size, (16, 4), cfg.data.synthetic_cls_dim)
    nan.arrays["latent"][:] = np.nan  # the job's synthetic dataset, every latent NaN
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps"):
        run_job("train", cfg, base["root"] / "nan", dataset=nan)
    st = _state(base["root"] / "nan", cfg, step=2)
    assert int(st.skipped) == 2 and int(st.nonfinite_streak) == 2 and int(st.step) == 2
    # nothing was updated: params equal the fresh initialisation (EMA too)
    _assert_same(st.params, st.ema, exact=True)


def test_restore_onto_1_and_2_devices(tmp_path_factory):
    """Saved on 8 devices (data 4 x fsdp 2); the job restores onto 1 device and onto 2 (fsdp 2) and trains 2 more
    steps: the same parameters as continuing on the 8 devices (same data order; summation order differs)."""
    from mmfm_jax.cli import run_job

    base = _baseline(tmp_path_factory)
    cont = base["root"] / "continue8"
    shutil.copytree(base["workdir"], cont)
    cfg8 = _cfg(base["source"], **{"train.num_steps": 8})
    s8 = run_job("train", cfg8, cont)
    assert s8["resumed_from"] == 6 and s8["final_step"] == 8
    ref = _state(cont, cfg8)
    for n, fsdp in ((1, 1), (2, 2)):
        wd = base["root"] / f"reshard{n}"
        shutil.copytree(base["workdir"], wd)
        cfg = _cfg(base["source"], **{"mesh.num_devices": n, "mesh.fsdp": fsdp, "train.num_steps": 8})
        s = run_job("train", cfg, wd)
        assert s["resumed_from"] == 6 and s["final_step"] == 8 and s["mesh"] == {"dcn_data": 1, "data": n // fsdp,
                                                                                     "fsdp": fsdp}
        assert s["checkpoints"] == [6, 8]
        _assert_same(_state(wd, cfg), ref, exact=False, rtol=1e-4)


def test_two_processes_four_devices_each(tmp_path_factory):
    from mp_launch import run_workers

    base = _baseline(tmp_path_factory)
    root, wd = base["root"], base["root"] / "mp"
    env = _env(root, devices=4)
    env.pop("JAX_NUM_CPU_DEVICES")
    outs = run_workers("mp_train_worker.py", [wd, base["source"]], timeout=300, env=env, cwd=str(REPO))
    assert "MP_OK" in outs[0]
    assert sorted(f.name for f in (wd / "checkpoints" / "6" / "data").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    cfg = _cfg(base["source"])
    # same trajectory as the single-process 8-device run (same data order and draws; reductions may differ)
    _assert_same(_state(wd, cfg), _state(base["workdir"], cfg), exact=False, rtol=1e-4)




def _tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files in ``tb_dir`` (TFRecord framing parsed by hand, no TensorFlow)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out


def test_metrics_reach_tensorboard(tmp_path_factory):
    base = _baseline(tmp_path_factory)
    got = _tb_scalars(base["workdir"] / "tb")
    for k in ("loss", "grad_norm", "lr", "skipped_total", "images_per_s", "tflops_per_device", "mfu"):
        assert f"train/{k}" in got, (k, sorted(got))
        steps = [s for s, _ in got[f"train/{k}"]]
        assert steps == sorted(steps) and steps[-1] == 6
    last = {k: v[-1][1] for k, v in got.items()}
    assert last["train/images_per_s"] > 0 and last["train/tflops_per_device"] > 0 and last["train/lr"] > 0
    assert last["train/mfu"] == pytest.approx(last["train/tflops_per_device"] / 1.0, rel=1e-5)  # peak 1 TFLOP/s
    assert np.isfinite(last["train/loss"]) and last["train/skipped_total"] == 0

"""Check reading real ``torch.save`` files (needs torch; not part of CI, which has no torch).

Run from the repo root: ``python launch/verify_torch_pt.py``. Builds small official-style ``.pt`` files in a temp dir
from the parity fixtures in ``tests/fixtures`` and checks that our converters read them: a DiT/RAE training
checkpoint (``ema`` selected over a zeroed ``model``, ``argparse.Namespace`` args, optimizer state), its DDP
(``module.``) and bf16 variants, a raw RAE decoder state dict, the pytorch-fid Inception ``.pth``, ``stat.pt``
(mean None / a tensor) and a file with a non-allowlisted class (refused, then read with ``trust_pickle=True``).
Prints one PASS/FAIL line per check; exits 1 on any failure. JAX runs on the CPU unless ``JAX_PLATFORMS`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from mmfm_jax.convert.common import load_state_dict  # noqa: E402
from mmfm_jax.convert.decoder import load_decoder  # noqa: E402
from mmfm_jax.convert.ditdh import load_official_ditdh  # noqa: E402
from mmfm_jax.convert.inception import load_inception  # noqa: E402
from mmfm_jax.data.stats import load_stats  # noqa: E402
from mmfm_jax.eval.resize import pytorch_fid_inputs  # noqa: E402
from mmfm_jax.models.ditdh import DiTDHConfig  # noqa: E402
from mmfm_jax.torch_io import TRUST_PICKLE_ENV, CheckpointError  # noqa: E402

FIX = REPO / "tests" / "fixtures"
TOL = 1e-5
FAILED: list[str] = []


class Custom:
    """A class no allowlist knows: torch.load(weights_only=True) must refuse it."""

    def __init__(self, value: int):
        self.value = value


def check(name: str, fn) -> None:
    try:
        detail = fn()
        print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)
    except Exception:  # noqa: BLE001
        FAILED.append(name)
        print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise AssertionError(msg)


def arrays(name: str) -> dict[str, np.ndarray]:
    with np.load(FIX / name) as z:
        return {k: z[k] for k in z.files}


def tensors(sd: dict[str, np.ndarray], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def tokens(x: np.ndarray) -> np.ndarray:
    """official [B, C, H, W] -> ours [B, H*W, C]."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]))


def rel_err(a, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


def training_checkpoint(ema: dict[str, torch.Tensor]) -> dict:
    """The DiT/RAE ``torch.save`` layout: model (zeroed here, so parity proves ema was read), ema, opt, args, step."""
    return {"model": {k: torch.zeros_like(v) for k, v in ema.items()}, "ema": ema,
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "args": argparse.Namespace(model="DiTDH-XL", lr=1e-4), "step": 5}


def ditdh_parity(path: Path) -> str:
    a = arrays("ditdh_small.npz")
    x, t, y = tokens(a["input/x"]), a["input/t"], a["input/y"].astype(np.int32)
    with jax.default_matmul_precision("highest"):
        model = load_official_ditdh(path, DiTDHConfig.preset("parity"))
        v = jax.jit(lambda m, *args: m(*args))(model, x, t, y)
    err = rel_err(v, tokens(a["output/velocity_cond"]))
    need(err < TOL, f"velocity_cond rel err {err:.3g} >= {TOL}")
    return f"velocity_cond rel err {err:.2e}"


def main() -> int:
    os.environ.pop(TRUST_PICKLE_ENV, None)
    print(f"torch {torch.__version__}, jax {jax.__version__} on {jax.default_backend()}", flush=True)
    ditdh_sd = load_state_dict(FIX / "ditdh_small.npz", prefix="param/")
    with tempfile.TemporaryDirectory(prefix="verify_torch_pt_") as tmp:
        tmp = Path(tmp)

        def ditdh_plain():
            torch.save(training_checkpoint(tensors(ditdh_sd)), tmp / "ckpt.pt")
            return ditdh_parity(tmp / "ckpt.pt")

        def ditdh_ddp():
            torch.save(training_checkpoint(tensors(ditdh_sd, "module.")), tmp / "ckpt_ddp.pt")
            need(all(k.startswith("module.") for k in load_state_dict(tmp / "ckpt_ddp.pt")), "prefix lost?")
            return ditdh_parity(tmp / "ckpt_ddp.pt")

        def ditdh_bf16():
            torch.save(training_checkpoint({k: v.bfloat16() for k, v in tensors(ditdh_sd).items()}),
                       tmp / "ckpt_bf16.pt")
            got = load_state_dict(tmp / "ckpt_bf16.pt")
            need(sorted(got) == sorted(ditdh_sd), "keys differ")
            for k, v in ditdh_sd.items():
                want = v.astype(ml_dtypes.bfloat16).astype(np.float32)
                need(got[k].dtype == np.float32 and got[k].shape == v.shape, f"{k}: {got[k].dtype} {got[k].shape}")
                need(np.array_equal(got[k], want), f"{k}: differs from the bf16-rounded fixture")
            return f"{len(got)} tensors bf16 -> float32, exact"

        def decoder():
            a = arrays("rae_decoder_small.npz")
            torch.save(tensors(load_state_dict(FIX / "rae_decoder_small.npz", prefix="param/")), tmp / "model.pt")
            with jax.default_matmul_precision("highest"):
                dec = load_decoder(tmp / "model.pt", "parity")
                logits = jax.jit(lambda m, z: m.logits(z))(dec, jnp.asarray(a["input/tokens"]))
            err = rel_err(logits, a["output/logits"])
            need(err < TOL, f"logits rel err {err:.3g} >= {TOL}")
            return f"logits rel err {err:.2e}"

        def inception():
            from fid_fixture import inception_arrays, inception_state_dict, nhwc_u8

            torch.save(tensors(inception_state_dict()), tmp / "pt_inception.pth")
            model = load_inception(tmp / "pt_inception.pth")
            graphdef, state = nnx.split(model)
            fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_intermediates=True)["pool"])
            ref = inception_arrays()["output/pool3_299"]
            with jax.default_matmul_precision("highest"):
                pool = np.asarray(fn(state, pytorch_fid_inputs(jnp.asarray(nhwc_u8(
                    inception_arrays()["input/images_299_uint8"])))))
            np.testing.assert_allclose(pool, ref, atol=2e-5, rtol=1e-4)  # tests/test_inception.py's tolerance
            err = rel_err(pool, ref)
            need(err < TOL, f"pool3 rel err {err:.3g} >= {TOL}")
            return f"pool3 rel err {err:.2e}"

        def stats():
            var, mean = torch.rand(768, 16, 16), torch.randn(768, 16, 16)
            torch.save({"mean": None, "var": var}, tmp / "stat.pt")
            torch.save({"mean": mean, "var": var}, tmp / "stat_mean.pt")
            want_v, want_m = (a.numpy().transpose(1, 2, 0).reshape(256, 768) for a in (var, mean))
            v, m = load_stats(tmp / "stat.pt")
            need(m is None and v.shape == (256, 768) and v.dtype == np.float32, f"{v.shape} {v.dtype} mean={m}")
            need(np.array_equal(v, want_v), "var != the transposed [C,H,W] tensor")
            v, m = load_stats(tmp / "stat_mean.pt")
            need(np.array_equal(v, want_v) and m is not None and np.array_equal(m, want_m), "mean/var differ")
            return "[768,16,16] -> [256,768], mean None and tensor"

        def untrusted():
            path = tmp / "custom.pt"
            torch.save({"model": tensors(ditdh_sd), "args": argparse.Namespace(lr=1e-4), "extra": Custom(3)}, path)
            try:
                load_state_dict(path)
                raise AssertionError("a non-allowlisted class was loaded with weights_only=True")
            except CheckpointError as e:
                msg = str(e)
            need("Custom" in msg and "trust_pickle=True" in msg and str(path) in msg, f"message: {msg}")
            need("argparse.Namespace" not in msg, f"Namespace should be allowlisted: {msg}")
            got = load_state_dict(path, trust_pickle=True)
            need(sorted(got) == sorted(ditdh_sd), "trust_pickle=True: wrong keys")
            os.environ[TRUST_PICKLE_ENV] = "1"
            try:
                need(sorted(load_state_dict(path)) == sorted(ditdh_sd), f"{TRUST_PICKLE_ENV}=1: wrong keys")
            finally:
                del os.environ[TRUST_PICKLE_ENV]
            return f"refused {msg.split('refused ', 1)[1].split('. If', 1)[0]}; read with trust_pickle"

        for name, fn in (("ditdh training ckpt (ema, Namespace args)", ditdh_plain), ("ditdh DDP module.", ditdh_ddp),
                         ("ditdh bf16", ditdh_bf16), ("rae decoder raw state dict", decoder),
                         ("inception pt_inception.pth", inception), ("stat.pt", stats),
                         ("non-allowlisted global", untrusted)):
            check(name, fn)
    print(json.dumps({"failed": FAILED}) if FAILED else "ALL PASS", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

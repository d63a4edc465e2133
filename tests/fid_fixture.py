"""Helpers for the ``inception_fid`` parity fixture: regenerate its torch state dict with numpy from the JSON rule."""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

_RULES = {
    "bias_0.1": lambda w, fan_in: 0.1 * w,
    "bn_running_mean": lambda w, fan_in: 0.1 * w,
    "bn_running_var": lambda w, fan_in: 1.0 + 0.5 * np.abs(w),
    "he_fan_in": lambda w, fan_in: w * np.sqrt(2.0 / fan_in),
    "lecun_fan_in": lambda w, fan_in: w * np.sqrt(1.0 / fan_in),
    "norm_bias": lambda w, fan_in: 0.1 * w,
    "norm_weight": lambda w, fan_in: 1.0 + 0.1 * w,
}


@functools.lru_cache(maxsize=1)
def inception_meta() -> dict:
    with open(FIXTURES / "inception_fid.json") as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def inception_state_dict() -> dict[str, np.ndarray]:
    """The torch state dict of the fixture's network, keyed by the official names (weights_table order, index i
    seeds ``default_rng([SEED, i])``). ``num_batches_tracked`` is included as int64 0, like a torch state dict."""
    meta = inception_meta()
    seed = int(meta["SEED"])
    sd = {}
    for i, (key, shape, dtype, rule) in enumerate(meta["weights_table"]):
        if rule == "as_constructed":
            sd[key] = np.zeros(shape, dtype=dtype)
            continue
        w = np.random.default_rng([seed, i]).standard_normal(tuple(shape), dtype=np.float64)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        sd[key] = _RULES[rule](w, fan_in).astype(np.float32)
    return sd


@functools.lru_cache(maxsize=1)
def inception_arrays() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "inception_fid.npz") as z:
        return {k: z[k] for k in z.files}


def nhwc_u8(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))

"""The FID Inception-v3 network (TF ``inception-2015-12-05`` graph as ported by pytorch-fid), in Flax NNX.

Architecture: pytorch-fid's ``fid_inception_v3()``: torchvision's Inception3 with ``Mixed_5b/5c/5d`` =
FIDInceptionA, ``Mixed_6b..6e`` = FIDInceptionC, ``Mixed_7b`` = FIDInceptionE_1, ``Mixed_7c`` = FIDInceptionE_2
(max-pool branch), ``Mixed_6a``/``Mixed_7a`` torchvision's reduction blocks, and a 1008-class ``fc``. Every conv is
``conv (no bias) -> BatchNorm (eval mode, eps 1e-3) -> ReLU``. The average-pool branches exclude the padding from the
count (TF semantics).

Module and attribute names follow the torch state dict (``Mixed_6d.branch1x1.conv``), so the converter in
``mmfm_jax.convert.inception`` is a direct name mapping. Images are NHWC.

Input: ``[N, 299, 299, 3]`` float, already scaled to the network range (see ``mmfm_jax.eval.resize``).
Output dict:
  - ``pool``: ``[N, 2048]`` pool3 features (FID, precision/recall),
  - ``logits``: ``[N, 1008]`` ``pool @ W + b``; ``logits_nobias``: ``pool @ W`` (Inception Score, as ADM),
  - ``spatial``: ``[N, 2023]`` the sFID features: TF ``mixed_6/conv`` (= ``Mixed_6d.branch1x1``, post-ReLU,
    ``[N, 17, 17, 192]``), first 7 channels, flattened in (H, W, C) order, as the ADM evaluator.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

BN_EPS = 1e-3
NUM_CLASSES = 1008
SFID_CHANNELS = 7


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BasicConv(nnx.Module):
    """``conv(bias=False) -> BatchNorm(eval, eps 1e-3) -> ReLU`` with torch-style symmetric padding."""

    def __init__(self, cin: int, cout: int, kernel: int | Sequence[int], stride: int = 1,
                 padding: int | Sequence[int] = 0, *, dtype: Any = jnp.float32, precision: Any = None,
                 rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, kernel_size=_pair(kernel), strides=stride, padding=((ph, ph), (pw, pw)),
                             use_bias=False, dtype=dtype, precision=precision, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    """3x3 max pool (padding, if any, with -inf), NHWC."""
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool with padding 1 that does not count the padding (TF / ``count_include_pad=False``)."""
    p = ((0, 0), (1, 1), (1, 1), (0, 0))
    s = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    n = jax.lax.reduce_window(ones, jnp.zeros((), x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
    return s / n


class InceptionA(nnx.Module):
    """FIDInceptionA: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(excl. pad)-1x1."""

    def __init__(self, cin: int, pool_features: int, **kw):
        self.branch1x1 = BasicConv(cin, 64, 1, **kw)
        self.branch5x5_1 = BasicConv(cin, 48, 1, **kw)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv(cin, pool_features, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Reduction 35 -> 17 (torchvision InceptionB): 3x3/s2 | 1x1-3x3-3x3/s2 | maxpool/s2."""

    def __init__(self, cin: int, **kw):
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    """FIDInceptionC (17x17 blocks, factorised 7x7). ``__call__`` returns (output, branch1x1 output)."""

    def __init__(self, cin: int, c7: int, **kw):
        self.branch1x1 = BasicConv(cin, 192, 1, **kw)
        self.branch7x7_1 = BasicConv(cin, c7, 1, **kw)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            bd = m(bd)
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nnx.Module):
    """Reduction 17 -> 8 (torchvision InceptionD): 1x1-3x3/s2 | 1x1-1x7-7x1-3x3/s2 | maxpool/s2."""

    def __init__(self, cin: int, **kw):
        self.branch3x3_1 = BasicConv(cin, 192, 1, **kw)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (``pool='avg'``, average pool excluding padding) / FIDInceptionE_2 (``pool='max'``)."""

    def __init__(self, cin: int, pool: str, **kw):
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE: pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv(cin, 320, 1, **kw)
        self.branch3x3_1 = BasicConv(cin, 384, 1, **kw)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 1, pad=1)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """FID Inception-v3. ``dtype``: compute dtype (params stay fp32); ``precision``: conv/matmul precision
    (default ``'highest'``: fp32 FID features on GPUs/TPUs too; the whole network is ~6 GFLOP per image)."""

    def __init__(self, *, dtype: Any = jnp.float32, precision: Any = "highest", rngs: nnx.Rngs):
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.dtype = dtype
        self.precision = precision
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, "avg", **kw)
        self.Mixed_7c = InceptionE(2048, "max", **kw)
        self.fc = nnx.Linear(2048, NUM_CLASSES, dtype=jnp.float32, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array, return_intermediates: bool = False) -> dict[str, jax.Array]:
        """``x``: ``[N, 299, 299, 3]`` in the network's input range. See the module docstring for the outputs.

        ``return_intermediates`` adds ``mixed_6_conv`` ``[N, 17, 17, 192]`` and ``spatial_mean/<block>`` ``[N, C]``.
        """
        inter: dict[str, jax.Array] = {}

        def note(name, y):
            if return_intermediates:
                inter[f"spatial_mean/{name}"] = jnp.mean(y.astype(jnp.float32), axis=(1, 2))
            return y

        x = x.astype(self.dtype)
        x = note("Conv2d_1a_3x3", self.Conv2d_1a_3x3(x))
        x = note("Conv2d_2a_3x3", self.Conv2d_2a_3x3(x))
        x = note("Conv2d_2b_3x3", self.Conv2d_2b_3x3(x))
        x = max_pool(x, 2)
        x = note("Conv2d_3b_1x1", self.Conv2d_3b_1x1(x))
        x = note("Conv2d_4a_3x3", self.Conv2d_4a_3x3(x))
        x = max_pool(x, 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a"):
            x = note(name, getattr(self, name)(x))
        x, _ = self.Mixed_6b(x)
        note("Mixed_6b", x)
        x, _ = self.Mixed_6c(x)
        note("Mixed_6c", x)
        x, mixed_6_conv = self.Mixed_6d(x)
        note("Mixed_6d", x)
        x, _ = self.Mixed_6e(x)
        note("Mixed_6e", x)
        for name in ("Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = note(name, getattr(self, name)(x))
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        kernel = self.fc.kernel.get_value()
        logits_nobias = jnp.matmul(pool, kernel, precision=self.precision)
        out = {
            "pool": pool,
            "logits": logits_nobias + self.fc.bias.get_value(),
            "logits_nobias": logits_nobias,
            "spatial": sfid_features(mixed_6_conv.astype(jnp.float32)),
        }
        if return_intermediates:
            out["mixed_6_conv"] = mixed_6_conv.astype(jnp.float32)
            out.update(inter)
        return out


def sfid_features(mixed_6_conv: jax.Array) -> jax.Array:
    """``[N, 17, 17, C>=7]`` NHWC -> ``[N, 7*17*17]``: first 7 channels, (H, W, C) order (ADM's ``[..., :7]``)."""
    return mixed_6_conv[..., :SFID_CHANNELS].reshape(mixed_6_conv.shape[0], -1)


@functools.lru_cache(maxsize=8)
def _abstract_split(dtype_name: str, precision: Any) -> tuple[Any, Any]:
    model = nnx.eval_shape(lambda: InceptionV3(dtype=jnp.dtype(dtype_name), precision=precision, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def abstract_inception(dtype: Any = jnp.float32, precision: Any = "highest") -> InceptionV3:
    """An ``InceptionV3`` with abstract (shape-only) parameters: no random init cost; fill it with a converter.

    Building the module tree takes ~1 s, so the abstract tree is cached and a fresh copy is returned each call.
    """
    graphdef, state = _abstract_split(jnp.dtype(dtype).name, precision)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))

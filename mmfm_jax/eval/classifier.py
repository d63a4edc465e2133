"""A small MLP classifier trained inside a job, used as a feature extractor for Frechet distance and mode coverage
on small datasets (the digits demo, the toy experiments). Pure jax + optax; deterministic for a seed."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLPClassifier:
    params: list  # [(w, b), ...]

    def features(self, x: jax.Array) -> jax.Array:
        """x [N, D] -> penultimate activations [N, H]."""
        h = x
        for w, b in self.params[:-1]:
            h = jax.nn.gelu(h @ w + b)
        return h

    def logits(self, x: jax.Array) -> jax.Array:
        w, b = self.params[-1]
        return self.features(x) @ w + b


def _init(key, sizes):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = jax.random.normal(jax.random.fold_in(key, i), (a, b)) * np.sqrt(2.0 / a)
        params.append((w, jnp.zeros((b,))))
    return params


def train_classifier(x: np.ndarray, y: np.ndarray, n_classes: int, hidden: tuple[int, ...] = (128, 128),
                     steps: int = 600, batch: int = 128, lr: float = 3e-3, noise: float = 0.1, seed: int = 0
                     ) -> MLPClassifier:
    """Adam on cross-entropy with small input-noise augmentation (so features are smooth off the data)."""
    x = jnp.asarray(x, jnp.float32).reshape(len(x), -1)
    y = jnp.asarray(y, jnp.int32)
    key = jax.random.PRNGKey(seed)
    params = _init(key, (x.shape[1], *hidden, n_classes))
    tx = optax.adam(lr)
    opt = tx.init(params)

    def loss_fn(p, xb, yb):
        logits = MLPClassifier(p).logits(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run(params, opt):
        def step(carry, i):
            p, o = carry
            k = jax.random.fold_in(key, 1000 + i)
            idx = jax.random.randint(k, (batch,), 0, x.shape[0])
            xb = x[idx] + noise * jax.random.normal(jax.random.fold_in(k, 1), (batch, x.shape[1]))
            g = jax.grad(loss_fn)(p, xb, y[idx])
            upd, o = tx.update(g, o, p)
            return (optax.apply_updates(p, upd), o), None

        (params, opt), _ = jax.lax.scan(step, (params, opt), jnp.arange(steps))
        return params

    return MLPClassifier(run(params, opt))


@jax.jit
def _predict(clf: MLPClassifier, x: jax.Array):
    return clf.features(x), jnp.argmax(clf.logits(x), -1)


def features_and_predictions(clf: MLPClassifier, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f, p = _predict(clf, jnp.asarray(x, jnp.float32).reshape(len(x), -1))
    return np.asarray(f, np.float64), np.asarray(p)


def mode_coverage(pred: np.ndarray, n_classes: int, ref_freq: np.ndarray | None = None, min_share: float = 0.25
                  ) -> dict[str, float]:
    """Classifier-based coverage of generated samples.

    ``covered``: fraction of classes receiving at least ``min_share`` x their reference share of the samples;
    ``tv``: total variation between the predicted-class histogram and the reference class frequencies.
    """
    ref = np.full(n_classes, 1.0 / n_classes) if ref_freq is None else np.asarray(ref_freq, np.float64)
    hist = np.bincount(np.asarray(pred), minlength=n_classes).astype(np.float64)
    hist /= max(hist.sum(), 1.0)
    return {"covered": float(np.mean(hist >= min_share * ref)), "tv": float(0.5 * np.abs(hist - ref).sum())}

"""Checkpointer: round trip with the grain iterator, restore onto other meshes, fallback from a corrupt latest step,
SIGTERM guard."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.data import latents as lt
from mmfm_jax.train import optim
from mmfm_jax.train.checkpoint import Checkpointer, PreemptionGuard
from mmfm_jax.train.state import abstract_train_state, create_train_state


class Net(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.a = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, ("channels", "embed")), rngs=rngs)
        self.b = nnx.Linear(16, 8, kernel_init=nnx.with_partitioning(init, ("embed", "channels")), rngs=rngs)


TX = optim.make_optimizer(1e-3)


def _state(mesh):
    state, _, _ = create_train_state(Net, TX, mesh, seed=1, num_modes=4)
    # make it non-trivial: bump every leaf deterministically
    return jax.tree.map(lambda x: x + jnp.ones_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def _mem_iter():
    mem = lt.InMemoryLatents({"latent": np.arange(40 * 2, dtype=np.float32).reshape(40, 2, 1)})
    return lt.make_iterator(mem, 8, seed=0)


def _save_three(tmp_path):
    mesh = parallel.make_mesh((4, 2))
    state = _state(mesh)
    it = _mem_iter()
    ck = Checkpointer(tmp_path / "ck", max_to_keep=3)
    positions = {}
    for step in (1, 2, 3):
        next(it)
        positions[step] = next(_restored_copy(it))["latent"]  # what the next batch will be
        ck.save(step, jax.tree.map(lambda x, s=step: x * s if jnp.issubdtype(x.dtype, jnp.floating) else x, state),
                lt.iterator_state_bytes(it), {"step": step})
    ck.close()
    return jax.device_get(state), positions


def _restored_copy(it):
    it2 = _mem_iter()
    it2.set_state(it.get_state())
    return it2


def test_roundtrip_reshard_and_iterator(tmp_path):
    ref, positions = _save_three(tmp_path)
    for shape, ndev in (((1, 1), 1), ((1, 2), 2), ((2, 1), 2)):
        mesh = parallel.make_mesh(shape, jax.devices()[:ndev])
        target, sh, _ = abstract_train_state(Net, TX, mesh, seed=1, num_modes=4)
        it = _mem_iter()
        r = Checkpointer(tmp_path / "ck").restore(target, it)
        assert r.step == 3 and r.fallback_from is None and r.config == {"step": 3}
        for got, want, s in zip(jax.tree.leaves(r.state), jax.tree.leaves(ref), jax.tree.leaves(sh)):
            assert got.sharding == s and len(got.sharding.device_set) == ndev
            scale = 3 if np.issubdtype(want.dtype, np.floating) else 1
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want) * scale)
        np.testing.assert_array_equal(next(it)["latent"], positions[3])
    # the 8-device placement: FSDP on 'embed'
    mesh = parallel.make_mesh((4, 2))
    target, _, _ = abstract_train_state(Net, TX, mesh, seed=1, num_modes=4)
    r = Checkpointer(tmp_path / "ck").restore(target)
    assert r.state.params["a"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no "Event loop is closed" noise
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_falls_back(tmp_path, caplog, damage):
    ref, positions = _save_three(tmp_path)
    step_dir = tmp_path / "ck" / "3"
    if damage == "truncate":
        # the merged OCDBT array data (``_sharding`` and the per-process copies are not read with a target)
        files = sorted((step_dir / "state" / "d").iterdir(), key=lambda p: -p.stat().st_size)
        with open(files[0], "r+b") as f:
            f.truncate(files[0].stat().st_size // 2)
    else:
        (step_dir / "data" / "process_0-of-1.json").unlink()
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    target, _, _ = abstract_train_state(Net, TX, mesh, seed=1, num_modes=4)
    it = _mem_iter()
    ck = Checkpointer(tmp_path / "ck")
    with caplog.at_level("WARNING"):
        r = ck.restore(target, it)
    assert r.step == 2 and r.fallback_from == 3
    assert "cannot be restored" in caplog.text and "instead of the latest 3" in caplog.text
    # one line per unusable step, no tracebacks of the reads Orbax left running
    assert "Task exception was never retrieved" not in caplog.text and "Traceback" not in caplog.text
    np.testing.assert_array_equal(np.asarray(r.state.params["a"]["kernel"]), ref.params["a"]["kernel"] * 2)
    np.testing.assert_array_equal(next(it)["latent"], positions[2])
    # the bad step is moved aside: step 3 can be written again
    assert ck.all_steps() == [1, 2] and any((tmp_path / "ck_corrupt").iterdir())
    ck.save(3, r.state, lt.iterator_state_bytes(it), {"step": 3})
    ck.close()
    assert Checkpointer(tmp_path / "ck").all_steps() == [1, 2, 3]


def test_restore_with_another_process_count(tmp_path):
    """Data state written by 2 processes: the state restores and the iterator is positioned at the step."""
    ref, positions = _save_three(tmp_path)
    data = tmp_path / "ck" / "3" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    target, _, _ = abstract_train_state(Net, TX, mesh, seed=1, num_modes=4)
    it = _mem_iter()
    r = Checkpointer(tmp_path / "ck").restore(target, it)
    assert r.step == 3 and r.fallback_from is None
    np.testing.assert_array_equal(next(it)["latent"], positions[3])


def test_empty_dir_and_preemption_guard(tmp_path):
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    target, _, _ = abstract_train_state(Net, TX, mesh, seed=1, num_modes=4)
    assert Checkpointer(tmp_path / "none").restore(target) is None
    old = signal.getsignal(signal.SIGTERM)
    g = PreemptionGuard()
    assert not g.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert g.should_stop()
    g.close()
    assert signal.getsignal(signal.SIGTERM) == old
    # grain state JSON is what the Orbax grain handler writes
    it = _mem_iter()
    next(it)
    assert json.loads(lt.iterator_state_bytes(it)) == it.get_state()


class WideNet(nnx.Module):  # Net with another hidden width: a checkpoint of Net does not fit it
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.a = nnx.Linear(8, 32, kernel_init=nnx.with_partitioning(init, ("channels", "embed")), rngs=rngs)
        self.b = nnx.Linear(32, 8, kernel_init=nnx.with_partitioning(init, ("embed", "channels")), rngs=rngs)


def test_other_config_or_all_steps_unusable_never_discards_progress(tmp_path):
    from mmfm_jax.config_utils import ConfigError
    from mmfm_jax.train.checkpoint import CheckpointMismatchError

    _save_three(tmp_path)
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    target, _, _ = abstract_train_state(WideNet, TX, mesh, seed=1, num_modes=4)
    with pytest.raises(CheckpointMismatchError, match=r"ema/a/kernel: saved \(8, 16\), now \(8, 32\)") as e:
        Checkpointer(tmp_path / "ck").restore(target, _mem_iter())
    assert isinstance(e.value, ConfigError)  # the CLI reports it as a config error (exit code 2)
    assert Checkpointer(tmp_path / "ck").all_steps() == [1, 2, 3] and not (tmp_path / "ck_corrupt").exists()
    # every step damaged: stop rather than start fresh, and leave them in place
    for step in (1, 2, 3):
        (tmp_path / "ck" / str(step) / "data" / "process_0-of-1.json").unlink()
    target, _, _ = abstract_train_state(Net, TX, mesh, seed=1, num_modes=4)
    with pytest.raises(RuntimeError, match="no checkpoint step .* can be restored"):
        Checkpointer(tmp_path / "ck").restore(target, _mem_iter())
    assert Checkpointer(tmp_path / "ck").all_steps() == [1, 2, 3]


def test_save_killed_mid_write_is_ignored_and_rewritten(tmp_path):
    """A process killed during an async save leaves only Orbax's temporary directory (the step directory appears
    atomically when complete): restore ignores it and the step can be saved again."""
    ref, positions = _save_three(tmp_path)
    partial = tmp_path / "ck" / "4.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    target, _, _ = abstract_train_state(Net, TX, mesh, seed=1, num_modes=4)
    it = _mem_iter()
    ck = Checkpointer(tmp_path / "ck")
    assert ck.all_steps() == [1, 2, 3]
    r = ck.restore(target, it)
    assert r.step == 3 and r.fallback_from is None
    np.testing.assert_array_equal(np.asarray(r.state.params["a"]["kernel"]), ref.params["a"]["kernel"] * 3)
    ck.save(4, r.state, lt.iterator_state_bytes(it), {"step": 4})
    ck.close()
    assert Checkpointer(tmp_path / "ck").all_steps() == [2, 3, 4]  # max_to_keep=3


class BigNet(nnx.Module):  # arrays large enough to live in OCDBT data files (small ones are inline, CRC-checked)
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.a = nnx.Linear(64, 128, kernel_init=nnx.with_partitioning(init, ("channels", "embed")), rngs=rngs)


def test_bit_rot_is_detected_and_falls_back(tmp_path, caplog):
    """Single bits flipped in the array data files of the newest step: the restored arrays' checksums differ from
    the saved ones, the step is quarantined and the previous one restored; the warning names the array."""
    from mmfm_jax.train.checkpoint import state_checksums

    state, _, _ = create_train_state(BigNet, TX, parallel.make_mesh((4, 2)), seed=1, num_modes=4)
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, state, config={"step": 1})
    state2 = jax.tree.map(lambda x: x * 2 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    ck.save(2, state2, config={"step": 2})
    ck.close()
    saved = json.loads((tmp_path / "ck" / "2" / "checksums" / "metadata").read_text())["arrays"]
    assert saved == state_checksums(state2) and "params/a/kernel" in saved
    data = [p for p in (tmp_path / "ck" / "2" / "state").glob("ocdbt.process_*/d/*") if p.stat().st_size > 16384]
    assert data
    rng = np.random.default_rng(0)
    for p in data:  # one flipped bit per data file
        b = bytearray(p.read_bytes())
        b[int(rng.integers(len(b) // 4, len(b)))] ^= 1 << int(rng.integers(8))
        p.write_bytes(bytes(b))
    mesh = parallel.make_mesh((1, 2), jax.devices()[:2])  # verified on another mesh than the one that saved
    target, _, _ = abstract_train_state(BigNet, TX, mesh, seed=1, num_modes=4)
    ck = Checkpointer(tmp_path / "ck")
    with caplog.at_level("WARNING"):
        r = ck.restore(target)
    assert r.step == 1 and r.fallback_from == 2
    lines = [ln for ln in caplog.text.splitlines() if "checksum mismatch in array" in ln]
    assert len(lines) == 1 and "step 2" in lines[0] and "bit rot" in lines[0], caplog.text
    assert any(f"array {k} " in lines[0] for k in saved)
    _assert_tree_equal(r.state, state)
    assert ck.all_steps() == [1] and any((tmp_path / "ck_corrupt").iterdir())
    # the checksum of a sharded array does not depend on its sharding; a single flipped bit changes it
    one = jax.device_put(state.params["a"]["kernel"], jax.devices()[0])
    assert state_checksums({"k": one}) == state_checksums({"k": state.params["a"]["kernel"]})
    flipped = np.asarray(one).copy()
    flipped.view(np.uint32)[3, 5] ^= 1 << 30
    assert state_checksums({"k": flipped})["k"] != state_checksums({"k": one})["k"]


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

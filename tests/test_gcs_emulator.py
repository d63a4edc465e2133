"""The GCS emulator fixture: epath (gcsfs) and Orbax (tensorstore) both reach it."""

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def test_epath_and_orbax_round_trip(gcs_dir):
    root = epath.Path(gcs_dir)
    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / "a" / "x.json").write_text("{}")
    assert (root / "a" / "x.json").read_text() == "{}"
    assert not (root / "missing").exists()
    with ocp.CheckpointManager(root / "ckpt") as mgr:
        mgr.save(3, args=ocp.args.StandardSave({"w": jnp.arange(8.0)}))
        mgr.wait_until_finished()
        out = mgr.restore(3, args=ocp.args.StandardRestore({"w": jnp.zeros(8)}))
    np.testing.assert_array_equal(out["w"], np.arange(8.0))
    assert not epath.Path("gs:").exists()

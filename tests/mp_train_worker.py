"""One process of the 2-process x 4-device train test: ``python mp_train_worker.py PID PORT WORKDIR SOURCE``.

Runs the tiny train job for 4 steps (checkpoints at 2 and 4), then again to 6 steps with the same workdir (resumes
from 4 across both processes); process 0 prints ``MP_OK <json summary>``.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MMFM_NO_PROGRESS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)


def main() -> None:
    pid, port, workdir, source = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train_job import overrides  # the same config as the single-process baseline

    from mmfm_jax.cli import CONFIG_DIR, run_job
    from mmfm_jax.config_files import load_config

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    s1 = run_job("train", load_config(f"{CONFIG_DIR}/train.py:tiny", overrides(source, num_steps=4)), workdir)
    assert s1["final_step"] == 4 and not s1["resumed"], s1
    s2 = run_job("train", load_config(f"{CONFIG_DIR}/train.py:tiny", overrides(source, num_steps=6)), workdir)
    assert s2["resumed_from"] == 4 and s2["final_step"] == 6, s2
    if pid == 0:
        print("MP_OK " + json.dumps(s2, default=str), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

"""Every test sees 8 fake CPU devices; absl flags are marked parsed so grain workers can start."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MMFM_NO_PROGRESS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pathlib  # noqa: E402

import pytest  # noqa: E402
from gcs_emulator import gcs_dir, gcs_emulator  # noqa: E402,F401  (fixtures)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def repo_dir() -> pathlib.Path:
    return REPO

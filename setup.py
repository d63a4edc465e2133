"""Package layout only (metadata lives in pyproject.toml): ``mmfm_jax`` and its subpackages, plus the top-level
``configs/`` folder installed as ``mmfm_jax.configs`` so that ``--config=train.py:xl_mode`` works from a wheel; data
files (JSON / YAML / text, e.g. manifests) inside the packages are installed with them."""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["mmfm_jax", "mmfm_jax.*"], exclude=["*.__pycache__"])
      + ["mmfm_jax.configs"],
      package_dir={"mmfm_jax.configs": "configs"},
      package_data={"": ["*.json", "*.yaml", "*.txt", "*.toml"]})

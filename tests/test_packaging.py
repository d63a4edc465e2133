"""The wheel works outside the source tree: built from the project files, installed into a fresh virtual
environment (dependencies from this one, no network), its `mmfm-jax` console script runs a tiny job from another
directory with the configs shipped inside the package."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

PROJECT_FILES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "CITATION.cff", "mmfm_jax", "configs")


def test_wheel_installs_and_runs_a_job_elsewhere(repo_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in PROJECT_FILES:  # a clean copy: the build must not write into the checkout
        (shutil.copytree if (repo_dir / name).is_dir() else shutil.copy)(
            repo_dir / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (repo_dir / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("mmfm_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmfm_jax/configs/train.py" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert not [n for n in names if "__pycache__" in n]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    vsite = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies: this environment's site-packages, after the venv's own (plain paths: no .pth hooks, so an
    # editable install of the checkout stays invisible)
    deps = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    with open(os.path.join(vsite, "_deps_from_test_env.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(deps)) + "\n")
    # --ignore-installed: this environment's editable install of the checkout is on the venv's path and would
    # otherwise count as "already satisfied"
    subprocess.run([*pip, "--python", str(vpy), "install", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, capture_output=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu")
    env.pop("MMFM_NO_PROGRESS", None)
    where = subprocess.run([str(vpy), "-c", "import mmfm_jax, mmfm_jax.configs as c; print(mmfm_jax.__file__)"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(vsite)
    exe = str(venv / "bin" / "mmfm-jax")
    out = subprocess.run([exe, "train", "--config=configs/train.py:tiny", "--config.train.num_steps=2",
                          "--config.checkpoint.every_steps=1", "--workdir=w"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # stderr is a pipe: plain progress lines instead of a bar, every log line once, in our format
    assert "I mmfm_jax] train: 2/2 (100%)" in out.stderr and "\r" not in out.stderr
    assert not [ln for ln in out.stderr.splitlines() if ln.startswith(("INFO:", "WARNING:"))], out.stderr[-3000:]
    summary = json.loads((elsewhere / "w" / "summary.json").read_text())
    assert summary["final_step"] == 2 and summary["checkpoints"] == [1, 2]
    out = subprocess.run([exe, "fit-gmm", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0
    assert "variants: imagenet, official, official_siglip2_b, official_mae_b, tiny" in out.stdout

#!/usr/bin/env python3
"""Set up leworld in a virtual environment and run it: the README's two commands.

    python3 bootstrap.py main [overrides ...]    the main job (see MAIN below)
    python3 bootstrap.py test [pytest args ...]  the whole test suite

Both create .venv beside this file on first use (again whenever pyproject.toml changes), so they
work on a machine that has nothing but Python 3.10+: `main` with the community extra (gym-pusht,
HDF5), `test` with the test extra (that, pytest, and stable-worldmodel). Only the standard
library is used here. torch is installed first and on its own: on a machine without an NVIDIA driver it comes from
PyTorch's CPU index, so no CUDA packages are downloaded, and the project's own install then finds
it already satisfied. Set LEWORLD_VENV to put the environment elsewhere.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LEWORLD_VENV", ROOT / ".venv"))
TORCH = "torch==2.13.0"  # the tested CPU build, inside the range pyproject.toml allows
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MAIN = ["-m", "leworld.train", "env=pusht"]
TEST = ["-m", "pytest"]


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pip_install(*args: str) -> None:
    cmd = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_environment(extra: str) -> None:
    """The venv with leworld and `extra` installed: community for the main job (gym-pusht, HDF5),
    test for the tests (community, pytest, and stable-worldmodel to write HDF5 files with)."""
    stamp = VENV / ".leworld-installed"  # the pyproject.toml it was made from, then the extras in it
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    made = stamp.read_text().split() if stamp.exists() else []
    if made[:1] == [wanted] and extra in made[1:]:
        return
    if not venv_python().exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    has_nvidia_gpu = shutil.which("nvidia-smi") is not None
    pip_install(TORCH, *([] if has_nvidia_gpu else ["--extra-index-url", TORCH_CPU_INDEX]))
    pip_install("-e", f"{ROOT}[{extra}]")
    extras = {extra, "community"} | (set(made[1:]) if made[:1] == [wanted] else set())
    stamp.write_text(" ".join([wanted, *sorted(extras)]))


def main() -> None:
    if sys.version_info < (3, 10):
        sys.exit(f"error: leworld needs Python 3.10 or newer, this is {sys.version.split()[0]}")
    verbs = {"main": MAIN, "test": TEST}
    extras = {"main": "community", "test": "test"}
    if len(sys.argv) < 2 or sys.argv[1] not in verbs:
        sys.exit("usage: python3 bootstrap.py main|test [arguments passed on ...]")
    try:
        ensure_environment(extras[sys.argv[1]])
    except subprocess.CalledProcessError as err:
        sys.exit(f"error: installing into {VENV} failed ({err.cmd[-1]}); fix the message above and run again")
    os.chdir(ROOT)
    cmd = [str(venv_python()), *verbs[sys.argv[1]], *sys.argv[2:]]
    if os.name == "nt":
        sys.exit(subprocess.call(cmd))
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()

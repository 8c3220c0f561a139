import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

# MuJoCo picks its GL back end when first imported; make it EGL whatever a test imports first.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("LP_NUM_THREADS", "0")


def community_missing() -> str | None:
    """Why the community extra (pip install 'leworld[community]') cannot be used here, or None. CI
    installs it through the test extra; a machine without it (or without the libGL that OpenCV,
    under gym-pusht, loads) skips what needs it, and says why."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    for module in ("h5py", "gym_pusht.envs"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            return f"needs the community extra, pip install 'leworld[community]' ({err})"
    return None


needs_community = pytest.mark.skipif(community_missing() is not None, reason=str(community_missing()))


def env_names() -> list:
    """Every environment's name for parametrize, gym_pusht marked `needs_community`."""
    import envs

    return [pytest.param(name, marks=needs_community) if name == "gym_pusht" else name for name in envs.ENVS]


# a world model small enough for seconds on a CPU
TINY_MODEL = ["backbone=vit_cpu", "model.latent_dim=32", "backbone.patch_size=8", "backbone.dim=32", "backbone.depth=2",
              "backbone.heads=2", "model.encoder.projector.hidden=[64]",
              "model.predictor.width=32", "model.predictor.depth=2", "model.predictor.heads=2", "model.predictor.mlp_hidden=64",
              "model.predictor.projector.hidden=[64]", "model.sigreg.num_slices=64", "model.frameskip=2"]
TINY_RUN = ["logger=none", "env=tworoom", "env.kwargs.image_size=32", "env.scale.cpu.episodes=16",
            "env.episode_length=40", "train.batch_size=32", "train.lr=2e-3", "train.log_every=5", "train.val_every=20",
            "train.val_batches=2", "probe.frames=300", "probe.clips=32", "probe.horizon=3", "plan_after_training=false",
            "decode_after_training=false", "decoder.steps=30", "decoder.frames=500", "decoder.widths=[32,16,8]",
            "prior_after_training=false", "prior.steps=60", "prior.hidden=[64]", "prior.check_every=20", *TINY_MODEL]


def written_with_these_files(dataset):
    """Give a dataset folder whose tensors a test changed the content fingerprint of its files, as if
    its writer had written them so (a bad writer, not a damaged disk)."""
    from leworld.dataset.format import content_fingerprint

    meta = json.loads((dataset / "meta.json").read_text())
    (dataset / "meta.json").write_text(json.dumps(meta | {"content": content_fingerprint(dataset / "tensors")}))


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc (psutil is not a dependency)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return children


def codec(action_dim=2, frameskip=2, mean=0.0, std=1.0):
    """An action codec for models built in tests: raw actions in [-1, 1]."""
    from leworld.codec import ActionCodec

    return ActionCodec((mean,) * action_dim, (std,) * action_dim, (-1.0,) * action_dim, (1.0,) * action_dim, frameskip)


def run(verb, *args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`python -m leworld.<verb> <args>`, run in this process: the verb's own main() under that command
    line, its output and exit status as a new interpreter would give them, without the interpreter's
    start-up (3 s of imports each time). A changed environment (env=) needs a new interpreter:
    run_process."""
    if env is not None:
        return run_process(verb, *args, cwd=cwd, env=env)
    module = importlib.import_module(f"leworld.{verb}.__main__" if verb == "bench" else f"leworld.{verb}")
    out, err, argv, here = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    sys.argv, code = [f"{module.__file__}", *args], 0
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(["python", "-m", f"leworld.{verb}", *args], code, out.getvalue(), err.getvalue())


def run_process(verb, *args, **kwargs) -> subprocess.CompletedProcess:
    """`python -m leworld.<verb> <args>` in a new interpreter."""
    return subprocess.run([sys.executable, "-m", f"leworld.{verb}", *args], capture_output=True, text=True, **kwargs)


def train_probe_and_plan(tmp_path, env: str, eval_args: list[str]) -> tuple:
    """The whole path on `env` from the command line: train collects its missing dataset, trains a
    tiny model and probes it; eval plans with the checkpoint and with the simulator (model=oracle).
    -> the run folder and its probe.json."""
    data, run_dir = tmp_path / env, tmp_path / "run"
    tiny = [a for a in TINY_RUN if not a.startswith("env=")]
    done = run("train", *tiny, f"env={env}", f"data.path={data}", "train.epochs=2", f"run_dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((data / "meta.json").read_text())["env"]["name"] == env
    for model in [f"ckpt={run_dir}", "model=oracle"]:
        out = tmp_path / model.split("=")[0]
        oracle = [f"env={env}", "env.kwargs.image_size=32", f"data_path={data}", "model.frameskip=2"]
        done = run("eval", model, *(oracle if model == "model=oracle" else []), *eval_args, "protocol.videos=0",
                   f"out_dir={out}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((out / "eval.json").read_text())["summary"]
        assert 0 <= summary["planner"]["success_rate"] <= 1 and "random" in summary
    return run_dir, json.loads((run_dir / "probe.json").read_text())


@pytest.fixture(scope="session")
def data_path(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "tworoom"


@pytest.fixture(scope="session")
def trained(data_path, tmp_path_factory):
    """A tiny world model trained by a short run that first collects its (missing) dataset."""
    run_dir = tmp_path_factory.mktemp("runs") / "trained"
    done = run("train", *TINY_RUN, f"data.path={data_path}", "train.epochs=12", f"run_dir={run_dir}",
               "plan_after_training=true", "decode_after_training=true", "planner.samples=16", "planner.elites=4", "planner.iterations=2",
               "protocol.episodes=3", "protocol.goal_offset=10", "protocol.budget=8", "protocol.horizon=2", "protocol.videos=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "collecting it first" in done.stdout
    return run_dir, done.stdout



"""What every verb shares: its config from the command line, clean errors, the device and the
processes it runs on, its run folder, and its log (console, metrics file, wandb)."""

import datetime
import gc
import importlib.resources
import json
import os
import random
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from leworld import LeworldError
from leworld.folders import FolderLock, entries, lock_folder

CONFIG_DIR = Path(str(importlib.resources.files("leworld.configs")))
# old spellings of overrides (a prefix when they end in = or ., else the whole override), what replaced them
RENAMED = {"encoder=": ("backbone=", "configs/backbone/"), "model.encoder.backbone.": ("backbone.", "configs/backbone/"),
           "model=lewm": ("model=lewm_gpu", "or scale=gpu, which picks it")}
# the settings that name files and folders, whatever their text looks like
PATH_KEYS = {"path", "run_dir", "out", "out_dir", "ckpt", "data_path", "weights", "init", "val_path", "labels_path"}


# ---- config --------------------------------------------------------------------------------


def load_config(name: str, overrides: list[str] = ()) -> DictConfig:
    """Compose configs/<name>.yaml with hydra overrides (key=value, group=option). Every key a
    verb reads is in its config, so adding keys (+key=value) is refused: such a key would be ignored.
    A config with `presets` (train.yaml) takes the model preset of its scale unless model= names one."""
    for override in overrides:
        for old, (new, where) in RENAMED.items():
            if override == old or old.endswith(("=", ".")) and override.startswith(old):
                raise LeworldError(f"{override}: {old} is now {new} ({where}); pass {new + override[len(old):]}")
    added = [o for o in overrides if o.startswith("+")]
    if added:
        raise LeworldError(f"{added[0]}: leworld's configs take no new keys (one that is not in the config would be "
                           f"ignored); python -m leworld.{name} --help lists every key")
    cfg = compose_config(name, list(overrides))
    preset = OmegaConf.select(cfg, f"presets.{cfg.get('scale')}")
    if preset is not None and preset != cfg.model.name and not any(o.startswith("model=") for o in overrides):
        cfg = compose_config(name, [f"model={preset}", *overrides])
    for override in overrides:  # run_dir=2024 or out=nan name folders: hydra read them as numbers
        key, _, text = override.partition("=")
        if key.rsplit(".", 1)[-1] in PATH_KEYS and isinstance(OmegaConf.select(cfg, key, default=""), (int, float)):
            OmegaConf.update(cfg, key, text)
    OmegaConf.set_struct(cfg, True)  # a typo in code or on the command line is an error, not a new key
    return cfg


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """hydra's composition, its errors as one line."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(name, overrides=overrides)
    except MissingConfigException as err:
        if err.missing_cfg_file and "/" in err.missing_cfg_file:
            group, choice = err.missing_cfg_file.rsplit("/", 1)
            options = ", ".join(err.options or [])
            raise LeworldError(f"there is no {group}={choice}; choose one of: {options}") from None
        raise LeworldError(f"no config named {name!r} in {CONFIG_DIR}") from None
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        lines = [line.strip() for line in str(err).splitlines()
                 if line.strip() and not line.startswith(("See https", "To append to your config"))]
        raise LeworldError("bad override: " + "; ".join(lines) + f"; python -m leworld.{name} --help lists every key") from None


def require(cfg: DictConfig, key: str, message: str):
    """The value at a dotted key, or LeworldError(message) when the config leaves it unset (???)."""
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException:
        raise LeworldError(message) from None


MAX_IMAGE_SIZE = 1024  # pixels a side, for frames and views: a 1024-px PushT episode of 100 steps is 300 MB


_ABSENT = object()


class Above(float):
    """A lower bound the value must exceed, in a check_values rule: (float, Above(0), None) is "> 0"."""


def check_values(cfg: DictConfig, rules: dict[str, tuple]) -> None:
    """Check config values before any work: rules maps a dotted key to (type, lowest, highest),
    type int or float (an int is a float too), either bound None for none (Above(x) for a bound the
    value must exceed), or to nullable(...) of that when null is allowed too; a key whose value is
    a list has each of its elements checked; a key the config does not have is passed over (a
    table covers every model, backbone and planner). A rule (str, choices) names the words a
    setting may be. -> LeworldError naming the key and what it must be."""
    for key, (kind, low, *high_and_null) in rules.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:  # a setting this config does not have
            continue
        if kind is str:
            if value not in low:
                raise LeworldError(f"{key}={value}: it must be one of {', '.join(low)}")
            continue
        high, *null_allowed = high_and_null
        if value is None and null_allowed:
            continue
        listed = isinstance(value, (list, ListConfig))
        for element in (value if listed else [value]):
            numeric = isinstance(element, (int, float)) and not isinstance(element, bool)
            if kind is int and not isinstance(element, int):
                numeric = False
            too_low = low is not None and (element <= low if isinstance(low, Above) else element < low) if numeric else False
            if not numeric or element != element or too_low or (high is not None and element > high):
                wanted = "an integer" if kind is int else "a number"
                bounds = " and ".join(b for b in (f"{'>' if isinstance(low, Above) else '>='} {low:g}" if low is not None else "",
                                                  f"<= {high}" if high is not None else "") if b)
                shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
                raise LeworldError(f"{key}={shown!r}: {'each of its values' if listed else 'it'} must be {wanted}"
                                   f"{' ' + bounds if bounds else ''}{' (or null)' if null_allowed else ''}")


def nullable(rule: tuple) -> tuple:
    """A check_values rule that also lets the value be null (a setting whose null means "none" or "auto")."""
    return (*rule, True)


def prefixed(prefix: str, rules: dict) -> dict:
    """Rules written for a config node, for that node at `prefix` in a verb's config."""
    return {f"{prefix}.{key}": rule for key, rule in rules.items()}


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler, torchrun stopping its processes, `kill`), turned into the path Ctrl-C
    takes: what was being done says what it kept and how to continue, and the verb exits 143."""


def _stop(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough: the way out must not be cut short
    raise Stopped()


def run_main(config_name: str, run: Callable[[DictConfig], object], args: list[str] | None = None) -> None:
    """Entry point of a verb: `python -m leworld.<verb> key=value ...` (args: sys.argv[1:]).

    Errors the user can fix print as one line (`error: ...`) and exit with status 2. Ctrl-C exits
    130, SIGTERM 143, each after what was running has said what it kept.
    """
    args = sys.argv[1:] if args is None else args
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        if args and args[0] in ("-h", "--help"):
            print_help(config_name, load_config(config_name, args[1:]))
        else:
            run(load_config(config_name, args))
    except Exception as err:
        if not getattr(err, "user_error", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Stopped:
        print("stopped by SIGTERM", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_help(config_name: str, cfg: DictConfig) -> None:
    print(f"usage: python -m leworld.{config_name} [key=value | group=option ...]\n")
    for group in sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name in cfg):
        options = sorted(f.stem for f in (CONFIG_DIR / group).glob("*.yaml"))
        print(f"  {group}=  {' | '.join(options)}")
    print("\nresolved config:\n")
    print(OmegaConf.to_yaml(cfg))


# ---- devices and processes -----------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LeworldError(f"device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LeworldError(f"device={name} but this machine has no CUDA GPU; use device=auto or device=cpu")
    return device


@dataclass
class Processes:
    """This process's place among the data-parallel processes (one, without torchrun)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device_name: str) -> Processes:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name)
    if world_size == 1:
        return Processes(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world_size, device)


def stop_processes() -> None:
    """End the process group, all processes together. Whatever still holds the group (a DDP
    wrapper) must be released first: a gloo group destroyed later, when its peers have exited, waits
    for them forever."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU, where bf16 is many times slower."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---- run folder and log --------------------------------------------------------------------


def new_run_dir(path: str | None, verb: str) -> FolderLock:
    """A fresh run folder, locked by this process for its life (leworld/folders.py): the given
    path, or runs/<verb>/<date-time>. Never reuses a non-empty one; made and checked writable
    before any work is done in it. -> its lock, whose `folder` is the run folder."""
    if path is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        path = Path("runs") / verb / stamp
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LeworldError(f"run_dir={path} is a file, not a folder; choose another run_dir")
    lock = lock_folder(path, "wait for it to end, or choose another run_dir")
    if entries(path):
        lock.release()
        raise LeworldError(f"run_dir={path} already holds a run; choose another run_dir (nothing was overwritten)")
    return lock


def discard_run(lock: FolderLock, keep: str) -> None:
    """A run that failed before it had `keep` (its first checkpoint) leaves nothing behind, so that
    the same run_dir can be used again: what it wrote is removed, and the folder if it made it."""
    if (lock.folder / keep).exists():
        return
    for path in entries(lock.folder):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


class RunLog:
    """Console lines (kept in console.log), metric rows (metrics.jsonl) and, when asked, wandb.

    Only the main process writes; on the others every call does nothing.
    """

    def __init__(self, run_dir: Path | None, cfg: DictConfig, enabled: bool = True, resume_step: int | None = None):
        """resume_step: a resumed run continues from that step, so rows logged after it (by the
        run that was killed later than its last checkpoint) are dropped, not repeated."""
        self.enabled = enabled and run_dir is not None
        self.wandb = None
        if not self.enabled:
            return
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        metrics_file = run_dir / "metrics.jsonl"
        if resume_step is not None and metrics_file.exists():
            kept = []
            for line in metrics_file.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a row the kill cut short
            metrics_file.write_text("".join(kept))
        self.console = open(run_dir / "console.log", "a")
        self.metrics = open(metrics_file, "a")
        if cfg.logger.name == "wandb":
            try:
                import wandb  # imported here: it takes a second and most runs do not need it
            except ImportError:
                raise LeworldError("logger=wandb but wandb is not installed; pass logger=none or pip install wandb") from None

            self.wandb = wandb.init(
                project=cfg.logger.project,
                mode=cfg.logger.mode,
                dir=str(run_dir),
                name=run_dir.name,
                config=OmegaConf.to_container(cfg, resolve=True),
            )

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        tqdm.write(message)
        self.console.write(message + "\n")
        self.console.flush()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.console.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()

"""One results run, prepared for one GPU:  python -m leworld.results out=<folder> [size=paper]

The stages, each the verb a user would run, with the overrides of configs/results.yaml:

    collect          the PushT dataset, one worker per core (python -m leworld.collect)
    train            a world model for `minutes`, then its probe and planning under the protocol
                     (python -m leworld.train train.minutes=...)
    bench_train      the training step's clips/s and model FLOP utilisation (python -m leworld.bench train)
    bench_planning   ms per CEM solve, LeWM beside DINO-WM, eager and compiled (python -m leworld.bench planning)

summary.json in `out` is rewritten after every stage, so a run cut short keeps what it finished;
console.log holds everything printed. A stage that fails is recorded with its error and the next
one still runs: GPU time is too rare to lose the benchmarks to a failed training run.
"""

import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from leworld import LeworldError, settings
from leworld.bench.common import machine_name
from leworld.bench.planning import bench_planning
from leworld.bench.training import bench_train
from leworld.collect import collect, unfinished_collection
from leworld.folders import FolderLock, entries, lock_folder
from leworld.runtime import check_values, load_config, pick_device, require, run_main
from leworld.train import train
from leworld.training.preflight import collect_config


class Tee:
    """A stream that writes to the console and to a log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name):  # fileno, encoding, ...: the console's
        return getattr(self.stream, name)


class Stages:
    """The stages of one results run: each runs as its verb would (its command line in sys.argv),
    records its result or its error in summary.json, and a failed one does not stop the next."""

    def __init__(self, out: Path, summary: dict):
        self.out, self.summary, self.failed = out, summary, []

    def write(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str))

    def run(self, name: str, work, argv: list[str]) -> None:
        print(f"\n==== {name}: python -m {' '.join(argv)} ====", flush=True)
        start, argv_before = time.perf_counter(), sys.argv
        sys.argv = argv  # what the verb prints as its command is what it was given
        try:
            result = {"result": work()}
        except Exception as err:  # recorded; the next stage runs
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}"}
            self.failed.append(name)
        finally:
            sys.argv = argv_before
        self.summary["stages"][name] = {"seconds": round(time.perf_counter() - start, 1), **result}
        self.write()


def output_folder(path: str) -> FolderLock:
    """The new or empty folder `path`, locked by this process for the run (leworld/folders.py)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or entries(out)):
        raise LeworldError(f"out={out} is not an empty folder; choose a new one (nothing in it is overwritten)")
    lock = lock_folder(out, "wait for it to end, or choose another out=")
    if entries(out):  # filled by another process between the look and the lock
        lock.release()
        raise LeworldError(f"out={out} is not an empty folder; choose a new one (nothing in it is overwritten)")
    return lock


def results_run(cfg: DictConfig) -> dict:
    out_path = require(cfg, "out", "out=<folder> is needed: the new or empty folder for summary.json and console.log")
    check_values(cfg, settings.RESULTS)
    if cfg.size not in cfg.sizes:
        raise LeworldError(f"size={cfg.size} is not one of: {', '.join(cfg.sizes)}")
    stages = cfg.sizes[cfg.size]
    # the minutes alone bound the run: its preset's epochs would stop a fast card early
    train_args = [*stages.train, f"train.minutes={cfg.minutes}", "train.epochs=1000", f"device={cfg.device}",
                  "logger=none", f"run_dir={Path(out_path) / 'train'}"]
    train_cfg = load_config("train", train_args)  # a bad override fails here, before anything is made
    bench_args = {name: [*stages[name], f"device={cfg.device}"]
                  for name in ("bench_train", "bench_planning", "bench_planning_compiled") if stages[name]}
    bench_cfgs = {name: load_config("bench", args) for name, args in bench_args.items()}
    folder = output_folder(out_path)
    out = folder.folder
    summary = {"command": "python -m leworld.results " + " ".join(sys.argv[1:]), "size": cfg.size,
               "minutes": cfg.minutes, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_name(pick_device(cfg.device)), "overrides": OmegaConf.to_container(stages), "stages": {}}
    stages_run = Stages(out, summary)
    stage, failed = stages_run.run, stages_run.failed

    log = open(out / "console.log", "a")
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(stdout, log), Tee(stderr, log)
    try:
        data = Path(train_cfg.data.path)
        if not (data / "meta.json").exists():
            stage("collect", lambda: str(collect(collect_config(train_cfg, data, unfinished_collection(data)))),
                  ["leworld.collect", *(a for a in stages.train if a.startswith("env")), f"scale={train_cfg.scale}",
                   f"path={data}"])
        stage("train", lambda: train(train_cfg), ["leworld.train", *train_args])
        for name, bench in (("bench_train", bench_train), ("bench_planning", bench_planning),
                            ("bench_planning_compiled", bench_planning)):
            if name in bench_cfgs:
                stage(name, lambda: bench(bench_cfgs[name]), ["leworld.bench", name.split("_")[1], *bench_args[name]])
        summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        stages_run.write()
        print(f"\nresults in {out}: summary.json, console.log"
              + (f"; failed stages: {', '.join(failed)}" if failed else ""))
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        log.close()
        folder.release()
    if failed:
        raise LeworldError(f"stages {', '.join(failed)} failed (their errors are in {out / 'summary.json'}); the others ran")
    return summary


def main() -> None:
    run_main("results", results_run)


if __name__ == "__main__":
    main()

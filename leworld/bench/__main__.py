"""python -m leworld.bench <name> [key=value ...] (leworld/bench/__init__.py lists the benchmarks)."""

import sys

from omegaconf import DictConfig

from leworld import settings
from leworld.bench.data import bench_collect, bench_sampler
from leworld.bench.planning import bench_planning
from leworld.bench.sigreg import bench_sigreg
from leworld.bench.training import bench_train
from leworld.runtime import check_values, run_main

BENCHMARKS = {"sigreg": bench_sigreg, "collect": bench_collect, "sampler": bench_sampler, "planning": bench_planning,
              "train": bench_train}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name not in BENCHMARKS:
        print(f"usage: python -m leworld.bench {{{','.join(BENCHMARKS)}}} [key=value ...]", file=sys.stderr)
        sys.exit(2)

    def checked_run(cfg: DictConfig):
        check_values(cfg, settings.bench(cfg))
        return BENCHMARKS[name](cfg)

    run_main("bench", checked_run, sys.argv[2:])


if __name__ == "__main__":
    main()

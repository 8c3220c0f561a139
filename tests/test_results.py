"""python -m leworld.results, the prepared GPU results run, at its smoke size on a CPU: every stage
runs (collect, train for a time budget with probe and planning, the benchmarks; the compiled
planning stage, empty at this size, is timed on its own in tests/test_eval.py), summary.json and console.log say what each did, and a used output folder is refused
with nothing overwritten."""

import json

from conftest import run


def test_the_results_run_runs_every_stage_and_writes_its_summary(tmp_path):
    out = tmp_path / "results"
    done = run("results", f"out={out}", "size=smoke", "minutes=0.05", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["collect", "train", "bench_train", "bench_planning"]  # smoke compiles nothing
    assert not [name for name, stage in stages.items() if "error" in stage]
    trained = stages["train"]["result"]
    assert trained["steps"] > 25 and 0 <= trained["eval"]["planner"]["success_rate"] <= 1
    assert "block_angle.cos" in trained["probe"]["r2"]["trained"]
    assert (out / "train" / "checkpoint.safetensors").exists() and (tmp_path / "data" / "pusht-smoke" / "meta.json").exists()
    assert (out / "train" / "decoder" / "checkpoint.safetensors").exists() and list((out / "train" / "eval").glob("imagined_*.gif"))
    assert set(stages["bench_train"]["result"]["lewm_cpu"]) >= {"clips_per_s", "gflop_per_step", "mfu"}
    assert stages["bench_train"]["result"]["lewm_cpu"]["gflop_per_step"] > 0
    assert set(stages["bench_planning"]["result"]) == {"lewm_cpu 1 env", "dinowm_cpu 1 env"}
    log = (out / "console.log").read_text()
    assert "==== bench_planning: python -m leworld.bench planning planning.models=[lewm_cpu,dinowm_cpu]" in log
    assert "| dinowm_cpu | " in log and "what " in log and "planning success" in log

    before = (out / "summary.json").read_text()
    again = run("results", f"out={out}", "size=smoke", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: out={out} is not an empty folder; choose a new one (nothing in it is overwritten)"]
    assert (out / "summary.json").read_text() == before


def test_a_missing_folder_or_a_size_that_does_not_exist_is_one_line(tmp_path):
    done = run("results", f"out={tmp_path / 'r'}", "size=huge", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "error: size=huge is not one of: fast, paper, smoke"
    assert not (tmp_path / "r").exists()
    done = run("results", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: out=<folder> is needed: the new or empty folder for summary.json and console.log")

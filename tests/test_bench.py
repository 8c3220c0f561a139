"""python -m leworld.bench train: a preset with its backbone swapped (preset:backbone) is timed and
counted as that model, and a backbone that does not exist is one line."""

from conftest import run

TINY = ["train.batch_size=2", "train.warmup=0", "train.steps=1", "train.repeats=1"]


def test_bench_train_times_a_preset_with_another_backbone(tmp_path):
    done = run("bench", "train", "train.models=[lewm_cpu:vit_cpu,lewm_cpu]", *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")
            for line in done.stdout.splitlines() if line.startswith("| lewm")}
    assert set(rows) == {"lewm_cpu:vit_cpu", "lewm_cpu"}
    assert rows["lewm_cpu:vit_cpu"][2].strip() == "2.2M" and rows["lewm_cpu"][2].strip() == "3.1M"  # ViT, CNN


def test_bench_train_with_an_unknown_backbone_is_one_line(tmp_path):
    done = run("bench", "train", "train.models=[lewm_cpu:nope]", *TINY, cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "nope" in done.stderr, done.stderr

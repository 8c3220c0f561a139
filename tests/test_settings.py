"""Every numeric setting of every verb's config, with each preset, env, planner, backbone and data
choice, has a checked range in leworld/settings.py; and a value outside it is one line naming the key."""

import pytest
from omegaconf import OmegaConf

import envs
from leworld import LeworldError, settings
from leworld.runtime import CONFIG_DIR, check_values, load_config


def numeric_keys(cfg) -> set[str]:
    """Dotted keys of the config's numbers and non-empty lists of numbers (booleans are not numbers)."""
    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{prefix}{key}.")
            return
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if number(node) or isinstance(node, list) and node and all(number(v) for v in node):
            yield prefix[:-1]

    return set(walk(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False), ""))


def options(group: str) -> list[str]:
    return sorted(f.stem for f in (CONFIG_DIR / group).glob("*.yaml"))


def verbs():
    for model in [m for m in options("model") if m != "oracle"]:
        for planner in options("planner"):
            yield "train", [f"model={model}", f"planner={planner}"], settings.train
    for env in envs.ENVS:
        yield "train", [f"env={env}"], settings.train
        yield "collect", [f"env={env}", "workers=2"], lambda cfg: settings.COLLECT  # "auto" is resolved first
    for backbone in options("backbone"):
        yield "train", [f"backbone={backbone}"], settings.train
    for scale in options("scale"):
        yield "train", [f"scale={scale}"], settings.train
    for planner in options("planner"):
        yield "eval", [f"planner={planner}", "env=pusht", "model=oracle"], settings.evaluate
    yield "probe", [], lambda cfg: settings.PROBE_VERB
    yield "prior", [], lambda cfg: settings.PRIOR_VERB
    yield "surprise", [], lambda cfg: settings.SURPRISE_VERB
    yield "decode", [], lambda cfg: settings.DECODE_VERB
    for backbone in options("backbone"):
        for data in options("data"):
            yield "pretrain", [f"backbone={backbone}", f"data={data}"], settings.pretrain
    yield "results", ["out=x"], lambda cfg: settings.RESULTS
    yield "bench", [], settings.bench


@pytest.mark.parametrize("verb, overrides, table", list(verbs()),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v if isinstance(v, str) else "")
def test_every_numeric_setting_has_a_range(verb, overrides, table):
    cfg = load_config(verb, overrides)
    if verb == "results":  # its stages' settings are lists of overrides, checked by train and bench
        cfg = OmegaConf.masked_copy(cfg, ["minutes"])
    rules = table(cfg)
    unchecked = sorted(numeric_keys(cfg) - set(rules))
    assert not unchecked, f"python -m leworld.{verb} {' '.join(overrides)}: no range for {unchecked}"
    check_values(cfg, rules)  # and the defaults lie inside their ranges


def test_a_value_outside_its_range_names_the_key_and_the_range():
    cfg = load_config("train", ["planner=mppi", "planner.temperature=-5"])
    with pytest.raises(LeworldError, match=r"^planner.temperature=-5: it must be a number > 0$"):
        check_values(cfg, settings.train(cfg))
    cfg = load_config("train", ["model.encoder.projector.hidden=[64,0]"])
    with pytest.raises(LeworldError, match=r"model.encoder.projector.hidden=\[64, 0\]: each of its values must be"):
        check_values(cfg, settings.train(cfg))
    cfg = load_config("train", ["train.minutes=null", "protocol.receding_horizon=null"])  # null where null means none
    check_values(cfg, settings.train(cfg))


def test_one_size_choice_picks_the_frames_the_dataset_and_the_preset_and_old_spellings_name_the_new():
    gpu = load_config("train", ["scale=gpu"])
    assert (gpu.model.name, gpu.env.kwargs.image_size, gpu.data.path) == ("lewm_gpu", 224, "data/pusht-gpu")
    assert gpu.model.encoder.backbone.patch_size == 14 and gpu.model.encoder.backbone.image_size == 224
    assert load_config("train", ["scale=gpu", "model=lewm_cpu"]).model.name == "lewm_cpu"  # a preset given wins
    cpu = load_config("train", ["backbone=vit_cpu", "backbone.dim=48"])
    assert (cpu.model.name, cpu.model.encoder.backbone.dim, cpu.model.encoder.backbone.image_size) == ("lewm_cpu", 48, 64)
    assert load_config("pretrain", ["backbone=vit_cpu"]).train.weight_decay == 0.05  # LeJEPA's for a ViT
    assert load_config("pretrain", ["backbone=resnet18"]).train.weight_decay == 5e-4  # ... and for a ResNet
    with pytest.raises(LeworldError, match=r"^encoder=vit_cpu: encoder= is now backbone= .*pass backbone=vit_cpu$"):
        load_config("train", ["encoder=vit_cpu"])
    with pytest.raises(LeworldError, match=r"pass backbone.dim=8$"):
        load_config("train", ["model.encoder.backbone.dim=8"])
    with pytest.raises(LeworldError, match=r"^model=lewm: .*pass model=lewm_gpu$"):
        load_config("train", ["model=lewm"])
    for verb in ("collect", "eval"):
        assert load_config(verb, ["scale=gpu", "env=reacher"]).env.kwargs.image_size == 224

"""Configuration overlays shipped in configs/profiles and configs/datasets load cleanly, and the
member options they set are options of the members (checked without building backbones)."""

from pathlib import Path

import pytest
import yaml

from configs import CONFIG_DIR, load_config
from members.base import available_members, member_parameters

OVERLAYS = sorted([*CONFIG_DIR.glob("profiles/*.yaml"), *CONFIG_DIR.glob("datasets/*.yaml")])


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_overlay_loads_and_names_only_member_options(path: Path):
    cfg = load_config("benchmark", [path])  # unknown keys and wrong types raise ConfigError
    overlay = yaml.safe_load(path.read_text()) or {}
    for name, options in (overlay.get("members") or {}).items():
        assert name in available_members(), f"{path}: no member {name!r}"
        unknown = set(options) - set(member_parameters(name)) - {"trainer"}
        assert not unknown, f"{path}: {sorted(unknown)} are not options of {name}"
        assert set(options.get("trainer", {})) <= set(cfg["trainer"]), f"{path}: {name} trainer"
        for key, value in options.items():
            if key != "trainer":
                assert cfg["members"][name][key] == value, f"{path}: members.{name}.{key}"


def test_paper_profile_keeps_the_members_own_backbones():
    cfg = load_config("benchmark", [CONFIG_DIR / "profiles" / "paper.yaml"])
    assert cfg["benchmark"]["backbones"] == []  # else efficientnet_lite0 replaces them all
    assert cfg["members"]["patchcore"]["backbone"] == "wide_resnet50_2"
    assert cfg["members"]["stfpm"]["trainer"]["max_epochs"] == 100
    assert cfg["device"]["accelerator"] == "cuda"

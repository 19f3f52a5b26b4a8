"""Saved members load anywhere, without their weight files, and old formats are handled."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import members.backbones
from artifacts.io import ArtifactError, write_manifest
from members import create_member, load_member
from members.base import MEMBER_FILE, WEIGHTS_FILE
from tests.helpers import fit_member, outputs_equal, panel_loader


@pytest.fixture(scope="module")
def saved_padim(panels_dir, tmp_path_factory):
    member = create_member("padim", n_features=32)
    fit_member(member, panels_dir)
    return member, member.save(tmp_path_factory.mktemp("saved") / "padim")


def test_a_saved_member_loads_from_any_directory_without_weight_files(
    saved_padim, panels_dir, tmp_path, monkeypatch
):
    member, folder = saved_padim
    monkeypatch.chdir(tmp_path)  # no backbones/ here

    def no_file(*args, **kwargs):
        raise AssertionError("a saved member must not look for backbone weight files")

    monkeypatch.setattr(members.backbones, "find_weights", no_file)
    loaded = load_member(folder)
    images = next(iter(panel_loader(panels_dir, "test")))["image"][:4]
    assert outputs_equal(member, loaded, images)
    assert loaded.hparams["pretrained"] is True  # what it was fitted with, for a later refit


def test_fitted_statistics_are_row_major_after_fitting_and_loading(saved_padim, tmp_path):
    # A batched inverse comes column-major, and torch.save keeps strides: PaDiM's distances
    # read its inverse covariances three times slower that way (and gave the same answers).
    member, folder = saved_padim
    assert member.inv_covariance.is_contiguous()
    state = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    state["inv_covariance"] = state["inv_covariance"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not state["inv_covariance"].is_contiguous()
    torch.save(state, folder.parent / "column-major.pt")
    copy = tmp_path / "padim"
    shutil.copytree(folder, copy)
    (folder.parent / "column-major.pt").replace(copy / WEIGHTS_FILE)
    write_manifest(copy)
    loaded = load_member(copy)
    assert all(buffer.is_contiguous() for buffer in loaded.buffers())
    assert torch.equal(loaded.inv_covariance, member.inv_covariance)


def rewrite_format(folder, version: int, **config) -> None:
    meta = json.loads((folder / MEMBER_FILE).read_text())
    meta["format_version"] = version
    meta["config"].update(config)
    (folder / MEMBER_FILE).write_text(json.dumps(meta))
    write_manifest(folder)


def test_members_saved_before_the_lite_fix_are_refused_with_the_reason(saved_padim, tmp_path):
    _, folder = saved_padim
    old = tmp_path / "old"
    old.mkdir()
    for path in folder.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    rewrite_format(old, 1)
    with pytest.raises(ArtifactError, match="tf_efficientnet_lite0.*Fit it again"):
        load_member(old)


def test_members_saved_before_whose_computation_is_unchanged_still_load(panels_dir, tmp_path):
    member = create_member("padim", backbone="resnet18", pretrained=False, n_features=32)
    fit_member(member, panels_dir)
    folder = member.save(tmp_path / "resnet")
    rewrite_format(folder, 1)
    loaded = load_member(folder)
    images = torch.rand(2, 3, 128, 128)
    assert outputs_equal(member, loaded, images)


def test_the_backbone_options_are_declared_once_for_every_member_that_reads_a_backbone(
    saved_padim, tmp_path
):
    """PaDiM, PatchCore, STFPM, FastFlow and the supervised head take backbone, layers,
    pretrained and weights_dir from BackboneMember: none declares them again, the configuration
    shows each member's own default layers, and a member records them (defaults too), so that it
    is rebuilt with the backbone it was fitted on."""
    import inspect

    from members.base import BackboneMember, available_members, member_class, member_parameters

    readers = {n for n in available_members() if issubclass(member_class(n), BackboneMember)}
    assert readers == {"padim", "patchcore", "stfpm", "fastflow", "supervised"}
    for name in readers:
        cls = member_class(name)
        assert "backbone" not in inspect.signature(cls.__init__).parameters, name
        options = member_parameters(name)
        assert options["layers"] == cls.default_layers and options["pretrained"] is True, name
    assert member_parameters("patchcore")["layers"] == (2, 3)
    assert member_parameters("padim")["layers"] == (1, 2, 3)
    head = create_member("patchcore", pretrained=False, layers=[3])
    assert head.feature_extractor.layers == (3,)
    assert {k: head.hparams[k] for k in ("backbone", "layers", "pretrained", "weights_dir")} == {
        "backbone": "efficientnet_lite0",
        "layers": [3],
        "pretrained": False,
        "weights_dir": "backbones",
    }
    member, folder = saved_padim
    saved = json.loads((folder / MEMBER_FILE).read_text())["config"]
    assert saved["layers"] == [1, 2, 3] and saved["backbone"] == "efficientnet_lite0"
    assert load_member(folder).feature_extractor.layers == member.feature_extractor.layers

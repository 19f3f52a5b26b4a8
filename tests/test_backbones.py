"""Offline backbones: the packaged efficientnet_lite0, file lookup, hash check, no network."""

import socket

import pytest
import torch

from members.backbones import (
    BackboneWeightsError,
    available_backbones,
    check_hash_prefix,
    find_weights,
    load_backbone,
    load_pretrained_model,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_the_embedded_backbone_loads_pretrained_from_the_package(no_network, tmp_path):
    extractor = load_backbone("efficientnet_lite0", layers=(2, 3), weights_dir=tmp_path)
    assert extractor.channels == [40, 112]
    assert extractor.reductions == [8, 16]
    features = extractor(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    # Pretrained weights differ from a random initialisation with the same seed.
    torch.manual_seed(0)
    random_init = load_backbone("efficientnet_lite0", layers=(2, 3), pretrained=False)
    first = next(iter(extractor.body.state_dict().values()))
    assert not torch.equal(first, next(iter(random_init.body.state_dict().values())))


def test_pretrained_model_is_a_working_classifier(no_network):
    model = load_pretrained_model("efficientnet_lite0").eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    assert torch.isfinite(logits).all()


def test_frozen_extractor_stays_in_eval_mode_and_has_no_gradients():
    extractor = load_backbone("efficientnet_lite0", pretrained=False)
    extractor.train()
    assert not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())
    trainable = load_backbone("efficientnet_lite0", pretrained=False, frozen=False)
    trainable.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "wide_resnet50_2", "efficientnet_b0"])
def test_missing_weights_name_the_file_and_folder(no_network, tmp_path, name):
    with pytest.raises(BackboneWeightsError) as info:
        load_backbone(name, weights_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert ".pth" in message and "pretrained=False" in message


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2", "efficientnet_b0"])
def test_random_init_needs_no_file(no_network, tmp_path, name):
    extractor = load_backbone(name, pretrained=False, weights_dir=tmp_path)
    outs = extractor(torch.rand(1, 3, 64, 64))
    assert len(outs) == 2 and all(torch.isfinite(o).all() for o in outs)


def test_hash_prefix_mismatch_is_refused(tmp_path):
    bogus = tmp_path / "resnet18-f37072fd.pth"
    torch.save({"w": torch.zeros(1)}, bogus)
    with pytest.raises(BackboneWeightsError, match="SHA-256"):
        check_hash_prefix(bogus)
    with pytest.raises(BackboneWeightsError, match="SHA-256"):
        load_backbone("resnet18", weights_dir=tmp_path)


def test_file_in_weights_dir_is_preferred_and_checked(tmp_path):
    # A torchvision-style resnet18 file saved under a name without hash prefix is not looked
    # up; the published name is, and a corrupted file with that name is refused.
    (tmp_path / "resnet18-f37072fd.pth").write_bytes(b"not a torch file")
    path, spec = find_weights("resnet18", tmp_path)
    assert path.name == "resnet18-f37072fd.pth" and spec.key_style == "torchvision"
    with pytest.raises(BackboneWeightsError):
        load_backbone("resnet18", weights_dir=tmp_path)


def test_unknown_backbone_lists_the_available_ones():
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        load_backbone("resnet9000")
    assert {
        "resnet18",
        "resnet50",
        "wide_resnet50_2",
        "efficientnet_b0",
        "efficientnet_lite0",
    } <= set(available_backbones())

"""Offline backbones: the packaged efficientnet_lite0, file lookup, hash check, no network."""

import socket

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn import BatchNorm2d

from members.backbones import (
    BACKBONES,
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


# ImageNet classes of scikit-learn's two sample photographs.
PALACE, DAISY = 698, 985


def natural_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's sample photographs (china.jpg, flower.jpg) whole, and 32 random crops of
    them, in [0, 1] at ``size`` px."""
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(im).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    generator = torch.Generator().manual_seed(0)
    crops = []
    for photo in photos:
        for _ in range(16):
            y0, x0 = (
                int(torch.randint(d - 300, (1,), generator=generator)) for d in photo.shape[1:]
            )
            crops.append(photo[:, y0 : y0 + 300, x0 : x0 + 300])

    def resized(images: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(
            [
                F.interpolate(im[None], size=(size, size), mode="bilinear", antialias=True)
                for im in images
            ]
        )

    return resized(photos), resized(crops)


def batch_norm_gap(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Mean over batch-norm layers of |batch mean - running mean| / running sigma: how far the
    network's own ImageNet statistics are from what natural images produce in it."""
    gaps = []

    def record(module, args, _output):
        sigma = (module.running_var + module.eps).sqrt()
        gaps.append(((args[0].mean((0, 2, 3)) - module.running_mean).abs() / sigma).mean().item())

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, BatchNorm2d)]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    return sum(gaps) / len(gaps)


def normalized(images: torch.Tensor, name: str) -> torch.Tensor:
    spec = BACKBONES[name]
    return (images - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(
        1, 3, 1, 1
    )


def test_packaged_lite0_recognises_natural_images_as_the_project_loads_it(no_network):
    """The TF-ported lite0 in tf_efficientnet_lite0 with mean = std = 0.5: flower.jpg is a
    daisy (the old mapping, efficientnet_lite0 with ImageNet mean/std, said honeycomb and had no
    daisy in its top 5) and its batch-norm statistics fit natural crops (old mapping: 0.33)."""
    model = load_pretrained_model("efficientnet_lite0").eval()
    assert BACKBONES["efficientnet_lite0"].timm_name == "tf_efficientnet_lite0"
    photos, crops = natural_images(224)
    with torch.no_grad():
        top5 = model(normalized(photos, "efficientnet_lite0")).topk(5).indices
    assert PALACE in top5[0].tolist() and DAISY in top5[1].tolist()
    assert batch_norm_gap(model, normalized(crops, "efficientnet_lite0")) < 0.25


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_lite1_and_lite2_load_as_published(no_network, name):
    model = load_pretrained_model(name).eval()
    size = timm.models.get_pretrained_cfg(BACKBONES[name].timm_name).input_size[-1]
    photos, crops = natural_images(size)
    with torch.no_grad():
        top5 = model(normalized(photos, name)).topk(5).indices
    assert PALACE in top5[0].tolist()
    assert batch_norm_gap(model, normalized(crops, name)) < 0.25


def test_the_extractor_normalizes_inputs_as_its_network_was_trained():
    lite = load_backbone("efficientnet_lite0", pretrained=False)
    resnet = load_backbone("resnet18", pretrained=False)
    assert lite.mean.flatten().tolist() == [0.5, 0.5, 0.5] == lite.std.flatten().tolist()
    assert resnet.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


@pytest.mark.parametrize("layers", [(1, 2), (2, 3), (0, 1)])
def test_an_efficientnet_stops_after_its_last_layer_with_timms_maps(no_network, layers):
    """timm's features_only EfficientNet runs all seven stages whatever its out_indices; the
    extractor stops after the last one asked for (the type descriptors ask for two), with
    the very maps timm gives, on a panel's crops."""
    from data.synthetic import PanelGenerator

    extractor = load_backbone("efficientnet_lite0", layers)
    panel = torch.from_numpy(PanelGenerator(size=128, seed=1).generate_defective(0)["image"])
    crops = panel.unfold(0, 64, 64).unfold(1, 64, 64).reshape(-1, 1, 64, 64).expand(-1, 3, -1, -1)
    ran = []
    hooks = [
        b.register_forward_hook(lambda *_, i=i: ran.append(i))
        for i, b in enumerate(extractor.body.blocks)
    ]
    with torch.no_grad():
        maps = extractor(crops)
        stages = len(ran)
        expected = extractor.body((crops - extractor.mean) / extractor.std)
    for hook in hooks:
        hook.remove()
    assert len(maps) == len(expected) == len(layers)
    assert all(torch.equal(found, timm_map) for found, timm_map in zip(maps, expected))
    assert stages == max(extractor.body._stage_out_idx) < len(extractor.body.blocks)


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
        "efficientnet_lite1",
        "efficientnet_lite2",
        "efficientnet_lite0_ra",
    } <= set(available_backbones())

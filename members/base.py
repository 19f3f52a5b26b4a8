"""The member protocol, the registry and the factory.

Every detector is a ``Member``: an ``nn.Module`` that learns "normal" in ``fit`` and, in
inference, maps images in [0, 1] to ``{"pred_score": [B], "anomaly_map": [B, 1, H, W]}`` at
input resolution through its own ``compute_anomaly_map`` and ``compute_anomaly_score``.

Two kinds of member exist:

- feature members (``trainable = False``: PatchCore, PaDiM) implement ``fit_features``, a
  feature pass run through the trainer's Fabric object and gathered from every rank;
- trainable members (``trainable = True``) implement ``configure_optimizers`` and
  ``training_step`` and are trained by the shared Fabric loop in ``members.trainer``.

Members that reconstruct their input (``reconstructs = True``: autoencoder, VAE, DRAEM) also
implement ``reconstruct_images``, which the benchmark's image-quality figures compare with the
input.

For export (``deploy``), a member's inference splits into what an exported graph computes,
``graph_outputs`` (by default all of it), and what stays outside, ``finish_graph_outputs`` (by
default nothing: PatchCore keeps its nearest-neighbour search there); ``export_refusal`` says
why a member cannot be exported, if it cannot.

Members record their constructor arguments (``hparams``) so a fitted member saves to a folder
(``member.json`` + ``weights.pt`` + a SHA-256 manifest) and loads back with ``load_member``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from artifacts.io import (
    ArtifactError,
    VerifiedFolder,
    atomic_folder,
    atomic_torch_save,
    atomic_write_json,
    write_manifest,
)
from members.backbones import FeatureExtractor, load_backbone

if TYPE_CHECKING:
    from members.trainer import FabricTrainer

SCORE_AGGREGATIONS = ("max", "mean", "topk", "center")
MEMBER_FILE = "member.json"
WEIGHTS_FILE = "weights.pt"
# 2: EfficientNet-Lite backbones run as the TF ports they are (tf_efficientnet_liteN, inputs
# normalized with mean = std = 0.5) and PatchCore projects each layer to a common width.
FORMAT_VERSION = 2
_LITE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

_REGISTRY: dict[str, type[Member]] = {}


def register(name: str) -> Callable[[type[Member]], type[Member]]:
    """Class decorator: ``@register("patchcore")`` makes the member available to the factory."""

    def decorator(cls: type[Member]) -> type[Member]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"member name {name!r} is registered twice")
        cls.member_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _import_all_members() -> None:
    # Importing the package registers every member file (see members/__init__.py).
    import members  # noqa: F401


def available_members() -> list[str]:
    _import_all_members()
    return sorted(_REGISTRY)


def member_class(name: str) -> type[Member]:
    _import_all_members()
    if name not in _REGISTRY:
        raise KeyError(f"unknown member {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def create_member(name: str, **cfg: Any) -> Member:
    """Build member ``name`` from keyword configuration; unknown keys are a ``TypeError`` that
    names the key and lists the valid ones."""
    cls = member_class(name)
    valid = member_parameters(name)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise TypeError(f"member {name!r} got unknown option(s) {unknown}; valid: {sorted(valid)}")
    return cls(**cfg)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --- what the reconstruction members share -------------------------------------------------


def member_choices(name: str) -> dict[str, tuple[Any, ...]]:
    """The values each option of member ``name`` may take, where it declares them: every class
    from ``Member`` down declares its own options' (``option_choices``)."""
    choices: dict[str, tuple[Any, ...]] = {}
    for klass in reversed(member_class(name).__mro__):
        choices.update(vars(klass).get("option_choices", {}))
    return choices


def member_text_options(name: str) -> tuple[str, ...]:
    """The options of member ``name`` that take text or null (their null default cannot say
    so), as its classes declare them (``text_options``)."""
    names: list[str] = []
    for klass in reversed(member_class(name).__mro__):
        names += vars(klass).get("text_options", ())
    return tuple(names)


def member_parameters(name: str) -> dict[str, Any]:
    """Constructor options of member ``name`` with their defaults: those of every class from
    ``Member`` down that takes its own (the shared score aggregation, a backbone member's
    backbone options, the member's own), with the defaults its class sets
    (``option_defaults``)."""
    cls = member_class(name)
    params: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, Member)):
            continue
        if "__init__" not in vars(klass):
            continue
        for pname, p in inspect.signature(klass.__init__).parameters.items():
            if pname == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            params[pname] = None if p.default is inspect.Parameter.empty else p.default
    return {**params, **cls.option_defaults()}


class Member(nn.Module):
    """Base class of every detector. Subclasses call ``super().__init__(**common)`` with the
    shared options below and implement ``compute_anomaly_map``."""

    member_name: ClassVar[str] = "member"
    trainable: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = False
    # What the defaults cannot say of a class's own options, declared beside the code that reads
    # them (``member_choices``, ``member_text_options``; the configuration's schema reads them):
    # the values an option may take, and the options that take text or null.
    option_choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "score_aggregation": SCORE_AGGREGATIONS
    }
    text_options: ClassVar[tuple[str, ...]] = ()
    # Options a base class takes and records even when left at their defaults (``hparams``).
    recorded_options: ClassVar[tuple[str, ...]] = (
        "score_aggregation",
        "topk_percent",
        "center_sigma",
    )

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Defaults this class sets for options a base class takes (``member_parameters``)."""
        return {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__init__

        @functools.wraps(init)
        def recording_init(self: Member, *args: Any, **kw: Any) -> None:
            # Only the outermost constructor records: that is the one a user called.
            if "hparams" not in self.__dict__:
                bound = inspect.signature(init).bind(self, *args, **kw)
                bound.apply_defaults()
                hparams = {}
                for pname, value in list(bound.arguments.items())[1:]:
                    if (
                        inspect.signature(init).parameters[pname].kind
                        is inspect.Parameter.VAR_KEYWORD
                    ):
                        hparams.update(value)
                    else:
                        hparams[pname] = value
                self.__dict__["hparams"] = hparams
                init(self, *args, **kw)
                # The base classes' options, also when left at their defaults.
                for klass in type(self).__mro__:
                    for name in vars(klass).get("recorded_options", ()):
                        hparams.setdefault(name, getattr(self, name))
            else:
                init(self, *args, **kw)

        cls.__init__ = recording_init

    def __init__(
        self,
        score_aggregation: str = "max",
        topk_percent: float = 1.0,
        center_sigma: float = 0.25,
    ) -> None:
        super().__init__()
        if score_aggregation not in SCORE_AGGREGATIONS:
            raise ValueError(
                f"score_aggregation must be one of {SCORE_AGGREGATIONS}, got {score_aggregation!r}"
            )
        if not 0 < topk_percent <= 100:
            raise ValueError(f"topk_percent must be in (0, 100], got {topk_percent}")
        if center_sigma <= 0:
            raise ValueError(f"center_sigma must be positive, got {center_sigma}")
        self.score_aggregation = score_aggregation
        self.topk_percent = topk_percent
        self.center_sigma = center_sigma
        self.register_buffer("fitted", torch.tensor(False))

    # --- inference -------------------------------------------------------------------------

    def compute_anomaly_map(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Anomaly map ``[B, 1, H, W]`` at the resolution of ``images`` ``[B, C, H, W]``.

        ``features``: precomputed maps of this member's frozen backbone keyed by timm layer
        index (see ``shared_backbone_key``), so a hybrid runs a shared backbone once per batch.
        """
        raise NotImplementedError

    def shared_backbone_key(self) -> tuple | None:
        """Identity of the frozen backbone whose features this member consumes (its name and a
        digest of its weights, ``FeatureExtractor.weights_key``), or None if it has none."""
        extractor = getattr(self, "feature_extractor", None)
        if isinstance(extractor, FeatureExtractor) and extractor.frozen:
            return extractor.weights_key()
        return None

    def backbone_features(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """The member's backbone feature maps, in its layer order: taken from ``features`` when
        given, computed otherwise."""
        extractor: FeatureExtractor = self.feature_extractor
        if features is not None:
            missing = [i for i in extractor.layers if i not in features]
            if missing:
                raise KeyError(f"{self.member_name}: shared features lack layer(s) {missing}")
            return [features[i] for i in extractor.layers]
        return extractor(images)

    def reconstruct_images(self, images: torch.Tensor) -> torch.Tensor:
        """Members with ``reconstructs``: the reconstruction ``[B, 3, H, W]`` of ``images``
        ``[B, C, H, W]`` in [0, 1], on their scale (clamped to [0, 1])."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct its input")

    def compute_anomaly_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Image scores ``[B]`` aggregated from ``anomaly_map`` ``[B, 1, H, W]``."""
        return aggregate_scores(
            anomaly_map, self.score_aggregation, self.topk_percent, self.center_sigma
        )

    def score_aggregator(self, height: int, width: int) -> ScoreAggregator | None:
        """``compute_anomaly_score`` of a ``height x width`` map given a band of rows at a time
        (a panel's map kept on disk); None for a member whose score is not the shared
        aggregation (it overrides ``compute_anomaly_score``) and needs its map whole."""
        if type(self).compute_anomaly_score is not Member.compute_anomaly_score:
            return None
        return ScoreAggregator(
            height, width, self.score_aggregation, self.topk_percent, self.center_sigma
        )

    def forward(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        anomaly_map = self.compute_anomaly_map(images, features)
        return {"pred_score": self.compute_anomaly_score(anomaly_map), "anomaly_map": anomaly_map}

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Inference in eval mode without gradients; the caller's mode is restored."""
        self._check_fitted()
        was_training = self.training
        self.eval()
        try:
            return self(images, features)
        finally:
            self.train(was_training)

    # --- export (``deploy``) ----------------------------------------------------------------

    def export_refusal(self) -> str | None:
        """Why this member's inference cannot run as an exported graph, or None when it can."""
        return None

    def graph_outputs(
        self, images: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """What an exported graph of the member computes from ``images`` (and shared
        ``features``): by default the whole answer, ``(anomaly_map, pred_score)``. A member whose
        inference has a part that stays outside the graph (PatchCore's nearest-neighbour search)
        returns what that part starts from, and finishes in ``finish_graph_outputs``."""
        out = self(images, features)
        return out["anomaly_map"], out["pred_score"]

    def finish_graph_outputs(
        self, outputs: Sequence[torch.Tensor], size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """The member's answer from ``graph_outputs``' values (computed by an exported graph)
        for images of ``size``: by default those values are the answer."""
        anomaly_map, pred_score = outputs
        return {"pred_score": pred_score, "anomaly_map": anomaly_map}

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(f"member {self.member_name!r} is not fitted; call fit() first")

    # --- fitting ---------------------------------------------------------------------------

    def fit(
        self,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        trainer: FabricTrainer | None = None,
    ) -> Member:
        """Learn "normal" from ``train_loader`` (defect-free images); ``val_loader``: held-out
        normal images the member may calibrate on (``on_fit_end``). Returns the member; the
        trainer's history rows are in ``history_`` (empty for feature members)."""
        from members.trainer import FabricTrainer

        trainer = trainer or FabricTrainer()
        self.on_fit_start(trainer, train_loader)
        if self.trainable:
            self.history_ = trainer.fit(self, train_loader, val_loader)
        else:
            self.fit_features(trainer, train_loader)
            self.history_ = []
        self.on_fit_end(trainer, train_loader, val_loader)
        self.fitted.fill_(True)
        self.eval()  # a fitted member answers like a loaded one
        return self

    def fit_features(self, trainer: FabricTrainer, train_loader: Iterable) -> None:
        """Feature members: collect what they need from the training images."""
        raise NotImplementedError(f"{type(self).__name__} must implement fit_features")

    def on_fit_start(self, trainer: FabricTrainer, train_loader: Iterable) -> None:
        """Hook before training (or feature collection), e.g. image statistics or a teacher."""

    def on_fit_end(
        self, trainer: FabricTrainer, train_loader: Iterable, val_loader: Iterable | None
    ) -> None:
        """Hook after training (or feature collection), e.g. map-normalization statistics from
        ``val_loader``, or from ``train_loader`` without one."""

    # Trainable members override these three.
    def configure_optimizers(self) -> dict[str, Any]:
        """``{"optimizer": opt, "scheduler": sched or None, "interval": "epoch" | "step"}``."""
        raise NotImplementedError(f"{type(self).__name__} is not trainable")

    def training_step(self, batch: dict[str, Any]) -> torch.Tensor | dict[str, torch.Tensor]:
        """The loss of one batch (or a dict with ``"loss"`` and other scalars to log)."""
        raise NotImplementedError(f"{type(self).__name__} is not trainable")

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Scalars to log for one validation batch; by default the training loss."""
        out = self.training_step(batch)
        loss = out["loss"] if isinstance(out, dict) else out
        return {"val_loss": loss.detach()}

    # --- persistence -----------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the fitted member to ``folder`` atomically (a crash leaves the old one or none)."""
        self._check_fitted()
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            atomic_write_json(
                tmp / MEMBER_FILE,
                {
                    "member": self.member_name,
                    "format_version": FORMAT_VERSION,
                    "config": self.hparams,
                },
            )
            atomic_torch_save(self.state_dict(), tmp / WEIGHTS_FILE)
            write_manifest(tmp)
        return folder


class BackboneMember(Member):
    """A member that reads a pretrained backbone's feature maps (``load_backbone``: frozen, and
    run once per batch for every member of a hybrid that reads the same one). Its four options
    are declared here once; a member says which levels it reads by default (``default_layers``).

    Args:
        backbone: timm name of the backbone.
        layers: the feature levels read, timm indices (None: ``default_layers``).
        pretrained: the backbone's pretrained weights (from ``weights_dir`` or a package that ships
            them); False for random ones.
        weights_dir: where pretrained weights are looked up.
    """

    default_layers: ClassVar[tuple[int, ...]] = (1, 2, 3)
    recorded_options = ("backbone", "layers", "pretrained", "weights_dir")

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {"layers": cls.default_layers}

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[int] | None = None,
        pretrained: bool = True,
        weights_dir: str = "backbones",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.backbone = backbone
        self.layers = tuple(self.default_layers if layers is None else layers)
        self.pretrained, self.weights_dir = pretrained, weights_dir
        self.feature_extractor = load_backbone(backbone, self.layers, pretrained, weights_dir)


def load_member(
    folder: str | Path,
    map_location: str | torch.device = "cpu",
    files: VerifiedFolder | None = None,
) -> Member:
    """Load a member saved with ``Member.save``; each file is checked against the manifest as
    it is read (``files``: the member's folder as an enclosing manifest lists it, a hybrid's;
    by default its own manifest).

    The saved ``weights.pt`` holds every tensor, pretrained backbones included, so nothing is
    looked up in ``backbones/``: a member loads from any working directory. Members saved by an
    earlier format load where their computation is unchanged and are refused, with the reason,
    where it changed.
    """
    folder = Path(folder)
    own_manifest = files is None
    files = VerifiedFolder.open(folder) if files is None else files
    try:
        meta = files.read_json(MEMBER_FILE)
        name, config = meta["member"], meta["config"]
        version = int(meta.get("format_version", 1))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder / MEMBER_FILE}: not a saved member ({exc})") from exc
    _check_format(folder, name, config, version)
    # Build without reading a weights file; the state dict below brings the weights.
    pretrained = config.get("pretrained")
    build = {**config, "pretrained": False} if pretrained is not None else config
    member = create_member(name, **build)
    if pretrained is not None:
        member.hparams["pretrained"] = pretrained
        if hasattr(member, "pretrained"):
            member.pretrained = pretrained
    state = files.load_torch(WEIGHTS_FILE, map_location)
    _resize_buffers_to(member, state)
    try:
        member.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{folder / WEIGHTS_FILE} does not fit a {name!r} member: {exc}"
        ) from exc
    member.to(map_location)
    member.eval()
    if own_manifest:
        files.verify()  # whatever else the member's manifest lists
    return member


def _check_format(folder: Path, name: str, config: dict[str, Any], version: int) -> None:
    if version == FORMAT_VERSION:
        return
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{folder}: saved by a newer version (member format {version}; this one reads "
            f"{FORMAT_VERSION}); update the project"
        )
    reasons = []
    if config.get("backbone") in _LITE_BACKBONES:
        reasons.append(
            f"its {config['backbone']} backbone ran the TF-ported weights in the wrong network "
            "(PyTorch padding, ImageNet mean/std); they now run as published "
            f"(tf_{config['backbone']}, mean = std = 0.5), which changes every feature"
        )
    if name == "patchcore":
        reasons.append("PatchCore now projects each layer to a common width before concatenating")
    if reasons:
        raise ArtifactError(
            f"{folder}: this {name!r} member was saved by member format {version} and cannot be "
            f"scored as before: {'; '.join(reasons)}. Fit it again (e.g. re-run the benchmark)."
        )


def _resize_buffers_to(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    # Fitted buffers (memory banks, statistics) have data-dependent shapes. Made contiguous
    # whatever the saved strides: a batched inverse is column-major, and PaDiM's distances read
    # its 164 MB three times slower that way.
    for key, value in state.items():
        owner_path, _, buf_name = key.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if buf_name in owner._buffers and owner._buffers[buf_name] is not None:
            if owner._buffers[buf_name].shape != value.shape:
                owner._buffers[buf_name] = torch.empty(
                    value.shape, dtype=value.dtype, device=value.device
                )


def aggregate_scores(
    anomaly_map: torch.Tensor,
    method: str = "max",
    topk_percent: float = 1.0,
    center_sigma: float = 0.25,
) -> torch.Tensor:
    """Image scores ``[B]`` from maps ``[B, 1, H, W]``.

    ``max``: the largest pixel; ``mean``: the average; ``topk``: the mean of the top
    ``topk_percent`` % of pixels (robust to single hot pixels); ``center``: a Gaussian-weighted
    mean with standard deviation ``center_sigma`` times the image side, for setups where the
    object of interest sits in the middle.
    """
    flat = anomaly_map.flatten(1).float()
    if method == "max":
        return flat.amax(dim=1)
    if method == "mean":
        return flat.mean(dim=1)
    if method == "topk":
        k = max(1, math.ceil(flat.shape[1] * topk_percent / 100.0))
        return flat.topk(k, dim=1).values.mean(dim=1)
    if method == "center":
        h, w = anomaly_map.shape[-2:]
        ys = torch.linspace(-0.5, 0.5, h, device=flat.device)
        xs = torch.linspace(-0.5, 0.5, w, device=flat.device)
        weights = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * center_sigma**2))
        weights = (weights / weights.sum()).flatten()
        return flat @ weights
    raise ValueError(f"unknown score aggregation {method!r}; choose one of {SCORE_AGGREGATIONS}")


class ScoreAggregator:
    """``aggregate_scores`` of maps ``[B, 1, H, W]`` given a band of rows at a time
    (``update``), so that a panel's map need not be in memory whole. ``max`` and ``topk`` keep
    what they need (the running maximum, the running top ``k``) and give what the whole map
    gives; ``mean`` and ``center`` sum in float64, within float32 rounding of it."""

    def __init__(
        self,
        height: int,
        width: int,
        method: str = "max",
        topk_percent: float = 1.0,
        center_sigma: float = 0.25,
    ) -> None:
        if method not in SCORE_AGGREGATIONS:
            raise ValueError(
                f"unknown score aggregation {method!r}; choose one of {SCORE_AGGREGATIONS}"
            )
        self.height, self.width, self.method = height, width, method
        self.k = max(1, math.ceil(height * width * topk_percent / 100.0))
        self.center_sigma = center_sigma
        self.kept: torch.Tensor | None = None  # [B, ...]: the running figure
        self.rows = 0

    def _center_weights(self, top: int, rows: int) -> torch.Tensor:
        """The ``center`` weights of rows ``top:top + rows``, normalized over the whole map."""
        ys = torch.linspace(-0.5, 0.5, self.height, dtype=torch.float64)
        xs = torch.linspace(-0.5, 0.5, self.width, dtype=torch.float64)
        column, row = (torch.exp(-(v**2) / (2 * self.center_sigma**2)) for v in (ys, xs))
        return (column[top : top + rows, None] * row[None]) / (column.sum() * row.sum())

    def update(self, band: torch.Tensor) -> ScoreAggregator:
        """Add the next ``band [B, 1, rows, W]`` of rows (top to bottom)."""
        top, rows = self.rows, int(band.shape[-2])
        if top + rows > self.height or band.shape[-1] != self.width:
            raise ValueError(
                f"a band of {tuple(band.shape[-2:])} at row {top} does not fit a "
                f"{self.height} x {self.width} map"
            )
        flat = band.flatten(1).float()
        if self.method == "max":
            figure = flat.amax(dim=1)
            figure = figure if self.kept is None else torch.maximum(self.kept, figure)
        elif self.method == "topk":
            pool = flat if self.kept is None else torch.cat([self.kept, flat], dim=1)
            figure = pool.topk(min(self.k, pool.shape[1]), dim=1).values
        else:
            weights = (
                torch.full(
                    (rows, self.width), 1.0 / (self.height * self.width), dtype=torch.float64
                )
                if self.method == "mean"
                else self._center_weights(top, rows)
            )
            figure = flat.double() @ weights.flatten()
            figure = figure if self.kept is None else self.kept + figure
        self.kept, self.rows = figure, top + rows
        return self

    def result(self) -> torch.Tensor:
        """Image scores ``[B]`` (float32), once every row has been given."""
        if self.rows != self.height:
            raise ValueError(f"{self.rows} of the map's {self.height} rows were given")
        return (self.kept.mean(dim=1) if self.method == "topk" else self.kept).float()


def upsample_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B, 1, h, w]`` maps to ``size``."""
    if tuple(anomaly_map.shape[-2:]) == tuple(size):
        return anomaly_map
    return F.interpolate(anomaly_map, size=size, mode="bilinear", align_corners=False)


def gaussian_blur(anomaly_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of ``[B, 1, H, W]`` maps, reflect-padded, kernel radius ceil(4 sigma)."""
    if sigma <= 0:
        return anomaly_map
    radius = int(math.ceil(4 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=anomaly_map.dtype, device=anomaly_map.device)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    h, w = anomaly_map.shape[-2:]
    mode = "reflect" if min(h, w) > radius else "replicate"
    out = F.pad(anomaly_map, (radius, radius, 0, 0), mode=mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, radius, radius), mode=mode)
    return F.conv2d(out, kernel.view(1, 1, -1, 1))

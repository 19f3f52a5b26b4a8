"""Labeled validation data for fusion and grading: held-out normal images, plus copies of them
with defects the synthetic injector puts in (``data.synthetic.inject_defects``), with exact
masks, instance maps, types and levels. This is what makes thresholds, the learned combiner, the
grader and the type classifier fittable where real defects are scarce, without ever touching
the test images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from data.images import to_array, to_tensor
from data.synthetic import inject_defects
from metrics.severity import DEFECT_TYPES


def injected_validation_samples(
    normal_images: Iterable[torch.Tensor | np.ndarray],
    injections_per_image: int = 4,
    defect_types: Sequence[str] = DEFECT_TYPES,
    max_defects: int = 2,
    pixel_pitch_mm: float = 0.1,
    seed: int = 0,
    max_injected: int | None = None,
) -> list[dict[str, Any]]:
    """Each normal image as it is (label 0) and ``injections_per_image`` copies with 1 to
    ``max_defects`` injected defects each (label 1), levels cycling through 1-5.

    ``max_injected``: at most this many copies in all, spread evenly over the images (the
    first ones take one more where it does not divide), so that a large held-out set does not
    multiply the cost of fitting on them."""
    images = [to_array(image) for image in normal_images]
    copies = [injections_per_image] * len(images)
    if max_injected is not None and sum(copies) > max_injected:
        each, extra = divmod(max_injected, len(images))
        copies = [each + (k < extra) for k in range(len(images))]
    rng = np.random.default_rng(seed)
    samples = []
    drawn = 0
    for number, (array, count_of_copies) in enumerate(zip(images, copies)):
        # One group per held-out image, its injected copies with it: cross-validation inside
        # a fit never splits an image from its copies.
        group = f"held-out-{number}"
        samples.append({"image": array, "mask": None, "label": 0, "defects": [], "group": group})
        for _ in range(count_of_copies):
            count = int(rng.integers(1, max_defects + 1))
            levels = [1 + (drawn + i) % 5 for i in range(count)]
            drawn += 1
            injected = inject_defects(
                array,
                seed=rng,
                defect_types=defect_types,
                n_defects=count,
                pixel_pitch_mm=pixel_pitch_mm,
                levels=levels,
            )
            if injected["label"]:
                samples.append({**injected, "group": group})
    return samples


def as_dataset_sample(sample: dict[str, Any], index: int, channels: int = 3) -> dict[str, Any]:
    """An injected validation sample in a dataset's sample layout (``image [C, H, W]``,
    ``mask [1, H, W]``, ``label``, ``defect_type``, ``path``), so anything that evaluates a
    dataset evaluates it too. ``path`` names it ``val-injected/<index>``."""
    image = to_tensor(np.asarray(sample["image"], dtype=np.float32), channels)
    mask = sample.get("mask")
    mask = np.zeros(image.shape[-2:], bool) if mask is None else np.asarray(mask) > 0
    defects = sample.get("defects") or []
    return {
        "image": image,
        "mask": torch.from_numpy(mask.reshape(image.shape[-2:]).astype(np.float32))[None],
        "label": int(sample["label"]),
        "defect_type": str(defects[0]["type"]) if defects and sample["label"] else "good",
        "path": f"val-injected/{index:05d}",
    }


def labeled_defect_sample(sample: dict[str, Any], has_mask: bool | None = None) -> dict[str, Any]:
    """A dataset sample with real labeled defects in the form fusion and grading learn from.

    Synthetic datasets carry per-defect truth (``instances``, ``defects`` with type and level)
    and keep it. A real dataset has a mask and the ``test/<type>`` folder name: each connected
    component of the mask becomes one defect of that type, with no level (levels are then
    learned from the synthetic injections only, types from these defects). ``split`` is
    ``"test"``: fusion fits its pixel normalizers on the held-out images alone, so that the
    hybrids of cross-validation folds share them. A defective image whose mask is unknown
    (``has_mask`` False; default: the sample's own ``has_mask``, else known) has ``mask``
    None and no defects: it teaches image scores, never pixels.
    """
    from scipy import ndimage

    mask = np.asarray(sample["mask"]).reshape(np.asarray(sample["mask"]).shape[-2:]) > 0
    out = {
        "image": to_array(sample["image"]),
        "mask": mask,
        "label": int(sample["label"]),
        "split": "test",
    }
    group = sample.get("group") or sample.get("path")
    if group:  # without one, each image is its own group
        out["group"] = str(group)
    if "instances" in sample and sample.get("defects"):
        instances = np.asarray(sample["instances"]).reshape(mask.shape)
        defects = [dict(d, source="labeled") for d in sample["defects"]]
    else:
        instances, count = ndimage.label(mask)
        kind = str(sample.get("defect_type") or "defect")
        defects = [
            {"id": k, "type": kind, "level": None, "source": "labeled"} for k in range(1, count + 1)
        ]
    out.update(instances=instances, defects=defects if out["label"] else [])
    known = sample.get("has_mask", True) if has_mask is None else has_mask
    if out["label"] and not known:
        out.update(mask=None, instances=None, defects=[])
    return out

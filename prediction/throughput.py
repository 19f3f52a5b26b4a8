"""How fast a hybrid predicts, beside its ceiling: images/s of the members' shared backbone
forward alone, of the members' pass, and of the whole hybrid (members, fusion, regions,
grading; no files written), on the same images, one image at a time and in batches.

    python -m prediction.throughput --hybrid DIR FOLDER [--batch-sizes 1,4] [--runtime onnx]

With ``--runtime onnx`` or ``openvino`` the members run as their exported graphs under ONNX
Runtime or OpenVINO Runtime (the ceiling, a PyTorch backbone pass, is then left out).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.images import LazyImage
from fusion.hybrid import Hybrid
from members.device import synchronize


def _images_per_second(
    run: Callable[[Sequence[Any]], None], images: Sequence[Any], device: Any = "cpu"
) -> float:
    run(images[:2])  # warm-up: first calls allocate
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        run(images)
        synchronize(device)
        best = max(best, len(images) / (time.perf_counter() - started))
    return best


def measure_throughput(
    hybrid: Hybrid, images: Sequence[np.ndarray], batch_sizes: Sequence[int] = (1, 4)
) -> dict[str, float]:
    """``{"<what>_batch<b>": images/s}``, best of two passes each: the ceiling (the shared
    backbones' forward on the members' inputs; only where members share a backbone), the
    members' pass and the whole hybrid (``predict_batch``), on ``images`` as their files hold
    them."""
    member_set = hybrid.member_set
    device = getattr(member_set, "device", "cpu")

    def window(image: np.ndarray) -> LazyImage:  # as predict_batch prepares it
        return LazyImage(image, hybrid.intensity_window)

    def batches(items: Sequence[Any], size: int):
        return (items[k : k + size] for k in range(0, len(items), size))

    figures: dict[str, float] = {}
    for size in batch_sizes:

        def ceiling(items: Sequence[Any], size: int = size) -> None:
            with torch.no_grad():
                for chunk in batches(items, size):
                    x = torch.cat(hybrid.member_inputs([window(image) for image in chunk]))
                    for extractor in member_set.extractors:
                        extractor(x.to(member_set.device))

        def members(items: Sequence[Any], size: int = size) -> None:
            for chunk in batches(items, size):
                hybrid.member_outputs_batch([window(image) for image in chunk], False)

        def whole(items: Sequence[Any], size: int = size) -> None:
            for chunk in batches(items, size):
                for result in hybrid.predict_batch(chunk):
                    if isinstance(result, Exception):
                        raise result

        if len(member_set.extractors):
            figures[f"backbone_ceiling_batch{size}"] = _images_per_second(ceiling, images, device)
        figures[f"member_pass_batch{size}"] = _images_per_second(members, images, device)
        figures[f"hybrid_batch{size}"] = _images_per_second(whole, images, device)
    return figures


def main(argv: list[str] | None = None) -> int:
    from graphs.runtime import RUNTIMES
    from prediction.inputs import expand_inputs, read_input

    parser = argparse.ArgumentParser(prog="python -m prediction.throughput", description=__doc__)
    parser.add_argument("--hybrid", required=True)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES)
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    files, _ = expand_inputs(args.paths)
    hybrid = Hybrid.load(Path(args.hybrid), runtime=args.runtime)
    # As predict holds them: in their files' dtype (the hybrid applies its intensity window).
    images = [image for image in map(read_input, files) if isinstance(image, np.ndarray)]
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    figures = measure_throughput(hybrid, images, sizes)
    rounded = {k: round(v, 2) for k, v in figures.items()}
    print(json.dumps({"images": len(images), "runtime": args.runtime, **rounded}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A saved hybrid's members exported as graphs beside it, in ``DIR/export/<format>/``.

The folder holds one graph per ``graphs.specs`` spec (ONNX: ``<name>.onnx``; OpenVINO:
``<name>.xml`` + ``<name>.bin``, converted from the same ONNX graphs), ``export.json`` (the
graphs, what each takes and gives, the input size, the opset, the exporter, the library
versions, the hybrid's identity and the parity measured at export) and a SHA-256 manifest. It is
written atomically: readers see the previous export or the new one, whole.

Graphs come from ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` and onnxscript), with
a free batch axis and the spatial size fixed to the members' input size (the tile size for a
tiled hybrid). Before anything is written, the graphs run on a probe batch of another size than
the traced one, and each member's maps and scores must match PyTorch's within ``TOLERANCE`` (see
``map_difference`` and ``score_difference``); an export that does not is refused. The check runs
under ONNX Runtime, and for OpenVINO again on the converted IR under OpenVINO Runtime, the
runtime that will run it (``export.json``'s ``parity`` is that last check's).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from artifacts.io import atomic_folder, atomic_write_json, manifest_id, write_manifest
from data.images import size_pair
from fusion.hybrid import Hybrid
from graphs.runtime import ExportedMemberSet
from graphs.specs import (
    EXPORT_FILE,
    FORMAT_VERSION,
    IMAGES,
    ExportError,
    GraphSpec,
    export_dir,
    export_refusals,
    graph_specs,
    refusal_text,
    require,
)
from members.member_set import MemberSet

FORMATS = ("onnx", "openvino")
DEFAULT_OPSET = 18
# The traced batch (torch.export specializes batch sizes 0 and 1) and the parity probe's.
TRACE_BATCH, PROBE_BATCH = 2, 3
# The largest difference allowed between the exported graphs' answers and PyTorch's on the probe:
# for maps relative to the spread (max - min) of PyTorch's map, for scores relative to the
# largest score's magnitude. A wrong graph is off by a large fraction; float32 graphs differ
# from PyTorch by rounding (measured: 1e-6 to 4e-5 of the spread where the map has contrast).
TOLERANCE = 1e-3
# A map's spread is floored at this share of its magnitude: on a nearly flat map (a DRAEM
# trained for two steps: values 0.0098 +- 4e-6) float32 rounding of the values themselves, a few
# units in the last place (7e-7 of the magnitude, as PyTorch differs from itself between batch
# sizes), is more than TOLERANCE of the spread, yet says nothing about the graph.
SPREAD_FLOOR = 1e-2


def member_input_size(hybrid: Hybrid) -> tuple[int, int]:
    """``(height, width)`` the hybrid's members take: its tile size, or its ``image_size``."""
    tiling = hybrid.tiling_options
    if tiling:
        return int(tiling["tile_size"]), int(tiling["tile_size"])
    size = size_pair(hybrid.image_size)
    if size is None:
        raise ExportError(
            "this hybrid's members take images at their own size; an export needs one member "
            "input size (build the hybrid with data.image_size set, or with tiling)"
        )
    return size


def export_hybrid(
    folder: str | Path, format: str = "onnx", opset: int = DEFAULT_OPSET
) -> tuple[Path, dict[str, Any]]:
    """Export the members of the hybrid saved in ``folder`` (see the module docstring); returns
    the export folder and its description (``export.json``)."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {FORMATS}")
    openvino = (
        require("openvino", "--format openvino", "pip install openvino")
        if format == "openvino"
        else None
    )
    onnx = require("onnx", "exporting to ONNX")
    require("onnxscript", "exporting to ONNX")
    ort = require("onnxruntime", "checking the exported graphs")
    folder = Path(folder)
    hybrid = Hybrid.load(folder)
    refusals = export_refusals(hybrid.member_set)
    if refusals:
        raise ExportError(f"{folder}: {refusal_text(refusals)}")
    size = member_input_size(hybrid)
    specs = graph_specs(hybrid.member_set)
    target = export_dir(folder, format)
    made_parent = not target.parent.exists()
    try:
        with atomic_folder(target) as tmp:
            examples: dict[str, dict[str, torch.Tensor]] = {}
            for spec in specs:
                _export_graph(spec, tmp / f"{spec.name}.onnx", size, opset, examples)
            description = {
                "format_version": FORMAT_VERSION,
                "format": "onnx",  # until converted
                "hybrid_id": manifest_id(folder),
                "members": hybrid.names,
                "input_size": list(size),
                "input": f"{IMAGES}: float32 [batch, 3, {size[0]}, {size[1]}], values in [0, 1]",
                "opset": opset,
                "exporter": "torch.onnx.export(dynamo=True)",
                "versions": {
                    "torch": torch.__version__,
                    "onnx": onnx.__version__,
                    "onnxruntime": ort.__version__,
                },
                "graphs": [_describe(spec, f"{spec.name}.onnx") for spec in specs],
                "tolerance": TOLERANCE,
            }
            description["parity"] = check_parity(hybrid.member_set, tmp, description)
            if openvino is not None:
                description = _to_openvino(openvino, tmp, description)
                # The IR is checked again under the runtime that will run it.
                description["parity"] = check_parity(hybrid.member_set, tmp, description)
            atomic_write_json(tmp / EXPORT_FILE, description)
            write_manifest(tmp)
    except BaseException:
        # A failed first export leaves no empty ``export/`` behind in the hybrid's folder.
        if made_parent and target.parent.is_dir() and not any(target.parent.iterdir()):
            target.parent.rmdir()
        raise
    return target, description


def _describe(spec: GraphSpec, file: str) -> dict[str, Any]:
    graph = {"file": file, "inputs": spec.inputs, "outputs": spec.outputs}
    if spec.member is None:
        return {**graph, "kind": "backbone", "members": spec.members}
    return {**graph, "kind": "head", "member": spec.member, "backbone": spec.backbone}


def _export_graph(
    spec: GraphSpec,
    path: Path,
    size: tuple[int, int],
    opset: int,
    examples: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Export one graph; ``examples`` holds each backbone graph's outputs on the traced images,
    which its heads are traced with."""
    images = torch.rand(TRACE_BATCH, 3, *size, generator=torch.Generator().manual_seed(0))
    shared = examples.get(spec.backbone, {}) if spec.backbone else {}
    inputs = [images, *(shared[name] for name in spec.inputs[1:])]
    module = spec.module.eval()
    with torch.no_grad():
        outputs = module(*inputs)
    if spec.member is None:
        examples[spec.name] = dict(zip(spec.outputs, outputs))
    else:
        spec.outputs = [f"output{k}" for k in range(len(outputs))]
    batch = torch.export.Dim("batch", min=1)
    # Shaped as the module's arguments: a head's shared feature maps are its varargs.
    dynamic: tuple = ({0: batch},)
    if len(inputs) > 1:
        dynamic += (tuple({0: batch} for _ in inputs[1:]),)
    what = f"member {spec.member!r}" if spec.member else f"backbone graph {spec.name}"
    try:
        with _quiet_exporter():
            # Captured here, exactly: left to itself, torch.onnx.export (torch 2.8) falls back
            # to torch.export's draft mode, which bakes a branch on the data into the graph.
            program = torch.export.export(
                module, tuple(inputs), dynamic_shapes=dynamic, strict=False
            )
            torch.onnx.export(
                program,
                tuple(inputs),
                str(path),
                input_names=spec.inputs,
                output_names=spec.outputs,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"{what} could not be exported to ONNX: {_summary(exc)}") from exc


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter reports its steps on stdout and its passes through the onnxscript and
    onnx_ir loggers, and warns about what it decomposes: noise when it succeeds (a failure
    raises)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _summary(exc: Exception) -> str:
    """The line of an exporter error that says what failed (its first lines say which step)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
    lines = [line for line in lines if line]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :]
    return lines[0] if lines else repr(exc)


def check_parity(
    member_set: MemberSet, folder: Path, description: Mapping[str, Any]
) -> dict[str, dict[str, float]]:
    """Each member's largest relative difference between the graphs in ``folder``, run by the
    runtime of ``description["format"]``, and PyTorch on a probe batch (``{"map": ...,
    "score": ...}``, see ``TOLERANCE``); an ``ExportError`` where one exceeds it."""
    size = description["input_size"]
    generator = torch.Generator().manual_seed(1)
    probe = torch.rand(PROBE_BATCH, 3, *size, generator=generator)
    exported = ExportedMemberSet(member_set.members, folder, description)
    try:
        graph_scores, graph_maps = exported(probe)
    except Exception as exc:  # the runtimes' errors have types of their own
        raise ExportError(
            f"the exported graphs cannot answer a probe batch of {PROBE_BATCH} (traced with "
            f"{TRACE_BATCH}): {_summary(exc)}; nothing was written"
        ) from exc
    torch_scores, torch_maps = member_set(probe)
    parity = {
        name: {
            "map": map_difference(graph_maps[:, k], torch_maps[:, k]),
            "score": score_difference(graph_scores[:, k], torch_scores[:, k]),
        }
        for k, name in enumerate(member_set.names)
    }
    failed = {name: p for name, p in parity.items() if max(p.values()) > TOLERANCE}
    if failed:
        raise ExportError(
            f"the exported graphs differ from PyTorch under {description['format']} by more "
            f"than {TOLERANCE} (relative) for {failed}; nothing was written"
        )
    return parity


def map_difference(found: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference between two batches of maps ``[B, H, W]``, each image's relative
    to the spread of its ``expected`` map (floored at ``SPREAD_FLOOR`` of its magnitude)."""
    expected = expected.double()
    difference = (found.double() - expected).abs().amax((1, 2))
    spread = expected.amax((1, 2)) - expected.amin((1, 2))
    scale = torch.maximum(spread, SPREAD_FLOOR * expected.abs().amax((1, 2)))
    return float(torch.where(scale > 0, difference / scale, difference).max())


def score_difference(found: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference between two batches of scores relative to the largest
    ``expected`` score's magnitude."""
    difference = float((found.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max())
    return difference / scale if scale > 0 else difference


def _to_openvino(openvino: Any, folder: Path, description: dict[str, Any]) -> dict[str, Any]:
    """The checked ONNX graphs in ``folder`` converted to OpenVINO IR (float32 weights kept),
    the ONNX files removed."""
    graphs = []
    for graph in description["graphs"]:
        source = folder / graph["file"]
        target = source.with_suffix(".xml")
        openvino.save_model(openvino.convert_model(source), target, compress_to_fp16=False)
        source.unlink()
        graphs.append({**graph, "file": target.name, "weights": target.with_suffix(".bin").name})
    versions = {**description["versions"], "openvino": openvino.__version__}
    return {**description, "format": "openvino", "graphs": graphs, "versions": versions}

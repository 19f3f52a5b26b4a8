"""A hybrid's members run as their exported graphs: ONNX Runtime or OpenVINO Runtime in place of
PyTorch.

``Hybrid.load(folder, runtime="onnx")`` (or ``"openvino"``) loads the hybrid with its members on
the CPU, checks its export in that format (``read_export``: files against their manifest,
exported from this very hybrid) and runs its members through an ``ExportedMemberSet``: each
shared backbone's graph once per batch, then each member's head graph under the format's runtime
(ONNX Runtime's CPUExecutionProvider, or OpenVINO Runtime's CPU plugin at float32 precision),
then what a member keeps outside its graph (``Member.finish_graph_outputs``: PatchCore's
nearest-neighbour search on its own memory bank, the reweighting, upsampling and blur) with
PyTorch. Fusion, regions and grading are the hybrid's own, unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artifacts.io import manifest_id, verify_manifest
from graphs.specs import (
    EXPORT_FILE,
    FORMAT_VERSION,
    IMAGES,
    ExportError,
    export_dir,
    export_refusals,
    refusal_text,
    require,
)
from members.base import Member
from members.member_set import MemberSet

# "onnx" and "openvino" run the export of the same name (``deploy.export`` writes it).
RUNTIMES = ("torch", "onnx", "openvino")


class _OnnxGraph:
    """One ONNX Runtime session, fed only the inputs its graph declares."""

    def __init__(self, path: Path) -> None:
        ort = require("onnxruntime", "predict.runtime onnx")
        options = ort.SessionOptions()
        # As many threads as PyTorch uses, so both runtimes get the same share of the machine;
        # not spinning once a graph is done: the threads of the next graph and PyTorch's (the
        # search, fusion) need the cores (spinning halved the member pass on 2 cores).
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its notes on unused initializers are noise
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {name: feeds[name] for name in self.inputs})


class _OpenVinoGraph:
    """One OpenVINO IR graph compiled for the CPU, fed only the inputs it declares; its
    outputs in the graph's order."""

    def __init__(self, path: Path) -> None:
        openvino = require("openvino", "predict.runtime openvino", "pip install openvino")
        core = openvino.Core()
        # float32 as exported (some CPUs would otherwise run bf16, outside the export's
        # tolerance), and PyTorch's number of threads, as ONNX Runtime gets.
        config = {
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }
        self.model = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.model.create_infer_request()
        self.inputs = [port.get_any_name() for port in self.model.inputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer({name: feeds[name] for name in self.inputs})
        # Copied: the request reuses its output buffers on the next call.
        return [np.array(results[port]) for port in self.model.outputs]


GRAPH_RUNNERS = {"onnx": _OnnxGraph, "openvino": _OpenVinoGraph}


class ExportedMemberSet(MemberSet):
    """A ``MemberSet`` whose members run as their exported graphs under the runtime of the
    export's format (``description["format"]``: ONNX Runtime or OpenVINO Runtime).

    Args:
        members: the fitted members by name, in order (what stays outside the graphs runs
            with them, on the CPU).
        folder: the export folder, holding the graphs ``description`` names.
        description: the export's ``export.json`` (``deploy.export``).
    """

    def __init__(
        self, members: Mapping[str, Member], folder: Path, description: Mapping[str, Any]
    ) -> None:
        # The backbones are shared inside the graphs: the torch members need no extractors.
        super().__init__(dict(members), share_backbones=False)
        runner = GRAPH_RUNNERS[description.get("format", "onnx")]
        self.input_size = tuple(description["input_size"])
        self.backbones: dict[str, tuple[Any, list[str]]] = {}
        self.heads: dict[str, tuple[Any, str | None]] = {}
        for graph in description["graphs"]:
            session = runner(Path(folder) / graph["file"])
            if graph["kind"] == "backbone":
                self.backbones[Path(graph["file"]).stem] = (session, graph["outputs"])
            else:
                self.heads[graph["member"]] = (session, graph["backbone"])
        if set(self.heads) != set(self.names):
            raise ExportError(
                f"{folder}: the export holds graphs of {sorted(self.heads)}; the hybrid's "
                f"members are {self.names}"
            )

    def member_answers(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(
                f"the exported graphs take images of {self.input_size[0]} x "
                f"{self.input_size[1]} (the members' input size), got {tuple(images.shape[-2:])}"
            )
        pixels = images.detach().float().cpu().contiguous().numpy()
        shared = {
            name: dict(zip(outputs, session.run({IMAGES: pixels})))
            for name, (session, outputs) in self.backbones.items()
        }
        size = self.input_size
        answers = []
        for name in self.names:
            session, backbone = self.heads[name]
            outputs = session.run({IMAGES: pixels, **shared.get(backbone, {})})
            tensors = [torch.from_numpy(output) for output in outputs]
            answers.append(self.members[name].finish_graph_outputs(tensors, size))
        return answers


def read_export(folder: str | Path, format: str, member_set: MemberSet) -> dict[str, Any]:
    """The description of the ``format`` export of the hybrid saved in ``folder`` (whose members
    ``member_set`` runs), after its files verified and its identity matched the hybrid's; an
    ``ExportError`` that says what to do when it is missing, stale or another hybrid's."""
    folder = Path(folder)
    target = export_dir(folder, format)
    command = f"python -m pipelines.export --hybrid {folder} --format {format}"
    if not (target / EXPORT_FILE).is_file():
        refusals = export_refusals(member_set)
        if refusals:
            raise ExportError(f"{folder} has no {format} export: {refusal_text(refusals)}")
        raise ExportError(f"{folder} has no {format} export in {target}; write it with: {command}")
    verify_manifest(target)
    try:
        description = json.loads((target / EXPORT_FILE).read_text())
        exported_from = description["hybrid_id"]
        version = description["format_version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{target / EXPORT_FILE}: not an export description ({exc})") from exc
    if version != FORMAT_VERSION:
        raise ExportError(f"{target}: export format {version} unsupported; export again: {command}")
    current = manifest_id(folder)
    if exported_from != current:
        raise ExportError(
            f"{target} was exported from another hybrid (identity {exported_from[:12]}…; this "
            f"one is {current[:12]}…): the hybrid changed since; export it again: {command}"
        )
    return description


def exported_member_set(folder: str | Path, runtime: str, member_set: MemberSet) -> MemberSet:
    """The members of the hybrid saved in ``folder`` (``member_set``, on the CPU) run as their
    ``runtime`` export (see the module docstring), refused with the reason when the export is
    missing, changed or another hybrid's."""
    if runtime not in GRAPH_RUNNERS:
        raise ExportError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    description = read_export(folder, runtime, member_set)
    return ExportedMemberSet(member_set.members, export_dir(folder, runtime), description)


def export_id(folder: str | Path, runtime: str) -> str:
    """What identifies the hybrid's ``runtime`` export: its manifest's SHA-256."""
    return manifest_id(export_dir(folder, runtime))

"""Export: every registered member as ONNX graphs beside its hybrid, run under ONNX Runtime with
the answers PyTorch gives; exports that cannot be made or trusted are refused with the reason."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from artifacts.io import ArtifactError, write_manifest
from data.images import read_image, write_png
from data.synthetic import PanelGenerator
from deploy.export import TOLERANCE, export_hybrid, map_difference, score_difference
from fusion.hybrid import Hybrid
from graphs.specs import EXPORT_FILE, ExportError, export_dir
from members import available_members, create_member
from members.base import member_class
from pipelines import predict
from tests.helpers import fit_member, fit_supervised, run_module

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Members sized for a test: a few training steps, a short teacher distillation. EfficientAD
# takes the panels at their own 128 px, as the default's members take 256 px images at its
# default 256 (at 256 on 128 px panels its fit alone took over 3 minutes of the suite).
OPTIONS = {"efficientad": {"distill_steps": 2, "input_size": 128}, "padim": {"n_features": 32}}


def validation_samples(size: int, count: int = 6) -> list[dict]:
    """Normal and defective panels (with their truth) of the generator the panels come from."""
    generator = PanelGenerator(size=size, seed=3)
    normal = [generator.generate_normal(i, split="val") for i in range(count)]
    return normal + [generator.generate_defective(i, split="val") for i in range(count)]


def copy_hybrid(source: Path, target: Path) -> Path:
    """The hybrid folder without its exports."""
    return Path(shutil.copytree(source, target, ignore=shutil.ignore_patterns("export")))


@pytest.fixture(scope="module")
def fitted(panels_dir, tmp_path_factory) -> dict:
    """A hybrid of every registered member, each fitted briefly on the 128 px panels, saved, and
    exported through the command line (stdout kept)."""
    members = {}
    for name in available_members():
        member = create_member(name, **OPTIONS.get(name, {}))
        if name == "supervised":  # it learns from defects, on cached features
            member = fit_supervised(member, panels_dir, max_epochs=1, max_steps=2)
        else:
            fit_member(member, panels_dir, max_epochs=1, max_steps=2)
        members[name] = member
    # Rank-mean: every member stays in the hybrid, so every member is exported.
    hybrid = Hybrid(members, image_size=128, combiner="rank", describer_backbone=None)
    folder = hybrid.fit(validation_samples(128)).save(tmp_path_factory.mktemp("h") / "hybrid")
    result = run_module("pipelines.export", "--hybrid", str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"folder": folder, "members": members, "stdout": result.stdout}


def _panels(panels_dir: Path, count: int = 6) -> list[np.ndarray]:
    test = panels_dir / "panel" / "test"
    defective = sorted(p for p in test.rglob("*.png") if p.parent.name != "good")
    return [read_image(p) for p in defective[:count]]


def _assert_members_agree(exported: Hybrid, reference: Hybrid, images: list) -> None:
    batch = torch.cat(reference.member_inputs(images))
    onnx_scores, onnx_maps = exported.member_set(batch)
    torch_scores, torch_maps = reference.member_set(batch)
    for k, name in enumerate(reference.names):
        map_error = map_difference(onnx_maps[:, k], torch_maps[:, k])
        score_error = score_difference(onnx_scores[:, k], torch_scores[:, k])
        assert max(map_error, score_error) <= TOLERANCE, (name, map_error, score_error)


def test_every_member_exports_and_matches_pytorch_on_panels(fitted, panels_dir):
    folder = fitted["folder"]
    description = json.loads((export_dir(folder, "onnx") / EXPORT_FILE).read_text())
    heads = {g["member"] for g in description["graphs"] if g["kind"] == "head"}
    assert heads == set(available_members())
    # The members on the shared efficientnet_lite0 take its maps from one backbone graph, run
    # once per batch, as MemberSet runs them.
    reference = Hybrid.load(folder, runtime="torch")
    (backbone,) = [g for g in description["graphs"] if g["kind"] == "backbone"]
    sharing = [n for n in reference.names if reference.member_set.backbone_keys[n] is not None]
    assert backbone["members"] == sharing and {"patchcore", "padim", "fastflow"} <= set(sharing)
    assert all(max(p.values()) <= description["tolerance"] for p in description["parity"].values())
    # The command said what it wrote.
    assert "member-patchcore.onnx" in fitted["stdout"] and EXPORT_FILE in fitted["stdout"]
    _assert_members_agree(Hybrid.load(folder, runtime="onnx"), reference, _panels(panels_dir))


@pytest.mark.slow
def test_exported_members_match_pytorch_on_kolektorsdd(fitted, kolektorsdd_dir):
    # Two cracked parts and two good ones, squashed to the members' 128 x 128 as predict does.
    test = kolektorsdd_dir / "test"
    paths = sorted((test / "crack").glob("*.jpg"))[:2] + sorted((test / "good").glob("*.jpg"))[:2]
    images = [read_image(p) for p in paths]
    folder = fitted["folder"]
    _assert_members_agree(
        Hybrid.load(folder, runtime="onnx"), Hybrid.load(folder, runtime="torch"), images
    )


def test_predict_with_onnx_runtime_gives_the_torch_scores_and_labels(
    fitted, panels_dir, tmp_path, capsys
):
    test = panels_dir / "panel" / "test"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sorted(test.rglob("*.png"))[::3]:
        shutil.copy(path, inputs / f"{path.parent.name}-{path.name}")
    results = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / runtime
        argv = ["--hybrid", str(fitted["folder"]), str(inputs), "--out", str(out)]
        assert predict.main([*argv, "--runtime", runtime, "--set", "predict.overlays=false"]) == 0
        images = json.loads((out / "predictions.json").read_text())["images"]
        results[runtime] = {Path(e["path"]).name: e for e in images}
    assert results["torch"].keys() == results["onnx"].keys() and len(results["torch"]) >= 6
    labels = [e["label"] for e in results["torch"].values()]
    assert 0 < sum(labels) < len(labels), "the panels hold normal and defective images"
    for name, expected in results["torch"].items():
        found = results["onnx"][name]
        assert found["score"] == pytest.approx(expected["score"], abs=1e-3), name
        assert (found["label"], found["level"]) == (expected["label"], expected["level"]), name
    # The two runtimes agree only within the export's tolerance: their results never mix.
    argv = ["--hybrid", str(fitted["folder"]), str(inputs), "--out", str(tmp_path / "torch")]
    assert predict.main([*argv, "--runtime", "onnx"]) == 1
    assert "results of another hybrid or runtime" in capsys.readouterr().err


def test_onnx_runtime_on_ray_actors_is_refused_with_what_to_do(fitted, tmp_path, capsys):
    argv = ["--hybrid", str(fitted["folder"]), str(tmp_path), "--out", str(tmp_path / "out")]
    assert predict.main([*argv, "--runtime", "onnx", "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "predict.runtime onnx" in err and "predict.executor local" in err, err


def test_map_difference_tells_rounding_on_a_flat_map_from_a_wrong_map():
    generator = torch.Generator().manual_seed(0)
    # A nearly flat map (an untrained DRAEM's: 0.0098 +- 4e-6) and the same map off by a few
    # float32 units in the last place: rounding, however small the spread.
    flat = 0.0098 + 4e-6 * torch.rand(2, 16, 16, generator=generator)
    rounded = flat * (1 + 8 * torch.finfo(torch.float32).eps)
    assert map_difference(rounded, flat) <= TOLERANCE
    # A map with contrast, and the other image's map in its place (a batch mix-up).
    contrast = torch.rand(2, 16, 16, generator=generator)
    assert map_difference(contrast.flip(0), contrast) > 100 * TOLERANCE
    # Relative to each image's own spread: a small error on a low-contrast image counts.
    low = contrast * torch.tensor([1.0, 0.01])[:, None, None] + 1.0
    assert map_difference(low + 1e-3 * torch.tensor([0.0, 1.0])[:, None, None], low) > TOLERANCE


@pytest.fixture(scope="module")
def tiled(fitted, tmp_path_factory) -> Path:
    """A hybrid of two of those members run tile by tile (128 px tiles on 256 px panels)."""
    members = {name: fitted["members"][name] for name in ("patchcore", "fastflow")}
    tiling = {"enabled": True, "tile_size": 128, "stride": 96, "batch_size": 4}
    hybrid = Hybrid(
        members, None, {**tiling, "reduction": "hann"}, combiner="rank", describer_backbone=None
    )
    return hybrid.fit(validation_samples(256, count=3)).save(tmp_path_factory.mktemp("t") / "h")


def test_a_tiled_hybrid_exports_at_its_tile_size(tiled):
    _, description = export_hybrid(tiled)
    assert description["input_size"] == [128, 128]
    exported, reference = Hybrid.load(tiled, runtime="onnx"), Hybrid.load(tiled, runtime="torch")
    # 3 x 3 tiles in batches of 4: the last batch holds one tile.
    image = PanelGenerator(size=256, seed=5).generate_defective(0)["image"]
    (onnx_scores, onnx_maps), (torch_scores, torch_maps) = (
        h.member_outputs(torch.from_numpy(image)[None].expand(3, -1, -1))
        for h in (exported, reference)
    )
    assert map_difference(torch.from_numpy(onnx_maps), torch.from_numpy(torch_maps)) <= TOLERANCE
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=TOLERANCE)


def _first_image_map(self, images, features=None):
    # A batch mix-up: every image gets the first one's map.
    out = self(images, features)
    return out["anomaly_map"][:1].expand_as(out["anomaly_map"]), out["pred_score"]


def _two_images(self, images, features=None):
    # A batch size built in: the graph answers two images, however many it is given.
    out = self(images, features)
    return out["anomaly_map"][:2], out["pred_score"][:2]


@pytest.mark.parametrize(
    ("graph_outputs", "message"),
    [(_first_image_map, "differ from PyTorch.*'fastflow'"), (_two_images, "probe batch of 3")],
)
def test_a_graph_that_computes_something_else_is_refused(
    tiled, tmp_path, monkeypatch, graph_outputs, message
):
    folder = copy_hybrid(tiled, tmp_path / "hybrid")
    monkeypatch.setattr(member_class("fastflow"), "graph_outputs", graph_outputs)
    with pytest.raises(ExportError, match=message):
        export_hybrid(folder)
    assert not export_dir(folder, "onnx").parent.exists()  # no empty export/ left behind


def test_a_member_that_cannot_be_exported_is_refused_with_the_reason(
    fitted, tmp_path, monkeypatch, capsys
):
    folder = copy_hybrid(fitted["folder"], tmp_path / "hybrid")
    reason = "its statistics are kept per training run"
    monkeypatch.setattr(member_class("draem"), "export_refusal", lambda self: reason)
    with pytest.raises(ExportError, match=f"draem: {reason}"):
        export_hybrid(folder)
    assert not export_dir(folder, "onnx").exists()  # nothing written
    argv = ["--hybrid", str(folder), str(tmp_path), "--out", str(tmp_path / "out")]
    status = predict.main([*argv, "--runtime", "onnx"])
    assert status == 1
    assert f"has no onnx export: its members cannot all be exported (draem: {reason})" in (
        capsys.readouterr().err
    )


def test_a_member_the_exporter_cannot_trace_is_named(fitted, tmp_path, monkeypatch):
    folder = copy_hybrid(fitted["folder"], tmp_path / "hybrid")
    original = member_class("autoencoder").graph_outputs

    def branching(self, images, features=None):  # a branch on the data: no graph has it
        outputs = original(self, images, features)
        return outputs if images.mean() > 0.5 else tuple(-output for output in outputs)

    monkeypatch.setattr(member_class("autoencoder"), "graph_outputs", branching)
    with pytest.raises(ExportError, match="member 'autoencoder' could not be exported to ONNX"):
        export_hybrid(folder)
    assert not export_dir(folder, "onnx").exists()


def test_a_missing_stale_or_tampered_export_is_refused(fitted, tmp_path):
    missing = copy_hybrid(fitted["folder"], tmp_path / "missing")
    with pytest.raises(ExportError, match="no onnx export.*python -m pipelines.export --hybrid"):
        Hybrid.load(missing, runtime="onnx")

    # The hybrid changed after its export (a new threshold, re-signed): the export is stale.
    stale = Path(shutil.copytree(fitted["folder"], tmp_path / "stale"))
    meta = json.loads((stale / "hybrid.json").read_text())
    meta["image_threshold"] += 0.1
    (stale / "hybrid.json").write_text(json.dumps(meta))
    listed = json.loads((stale / "manifest.sha256.json").read_text())["sha256"]
    write_manifest(stale, list(listed))
    with pytest.raises(ExportError, match="exported from another hybrid.*export it again"):
        Hybrid.load(stale, runtime="onnx")
    # Another hybrid's export copied in is refused alike.
    foreign = copy_hybrid(stale, tmp_path / "foreign")
    shutil.copytree(export_dir(fitted["folder"], "onnx"), export_dir(foreign, "onnx"))
    with pytest.raises(ExportError, match="exported from another hybrid"):
        Hybrid.load(foreign, runtime="onnx")

    tampered = Path(shutil.copytree(fitted["folder"], tmp_path / "tampered"))
    graph = export_dir(tampered, "onnx") / "member-padim.onnx"
    graph.write_bytes(graph.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match="member-padim.onnx"):
        Hybrid.load(tampered, runtime="onnx")


def test_openvino_without_its_package_is_refused_naming_it(tiled, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    folder = copy_hybrid(tiled, tmp_path / "hybrid")
    with pytest.raises(ExportError, match="needs the 'openvino' package.*pip install openvino"):
        export_hybrid(folder, "openvino")
    assert not export_dir(folder, "openvino").parent.exists()


def test_openvino_ir_predicts_as_pytorch_under_openvino_runtime(tiled, tmp_path, capsys):
    """The IR is checked under OpenVINO Runtime at export, and predict --runtime openvino gives
    PyTorch's labels, levels and scores (within the export's tolerance) on normal and defective
    panels, tile by tile."""
    pytest.importorskip("openvino")
    folder = copy_hybrid(tiled, tmp_path / "hybrid")
    target, description = export_hybrid(folder, "openvino")
    assert description["format"] == "openvino" and "openvino" in description["versions"]
    files = {p.name for p in target.iterdir()}
    assert not any(name.endswith(".onnx") for name in files)
    for graph in description["graphs"]:
        assert {graph["file"], graph["weights"]} <= files and graph["file"].endswith(".xml")
    assert set(description["parity"]) == {"patchcore", "fastflow"}
    assert all(max(p.values()) <= TOLERANCE for p in description["parity"].values())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    generator = PanelGenerator(size=256, seed=8)
    for k in range(3):
        for kind in ("normal", "defective"):
            panel = getattr(generator, f"generate_{kind}")(k, split="test")["image"]
            write_png(inputs / f"{kind}-{k}.png", panel, bits=16)
    results = {}
    for runtime in ("torch", "openvino"):
        argv = ["--hybrid", str(folder), str(inputs), "--out", str(tmp_path / runtime)]
        assert predict.main([*argv, "--runtime", runtime, "--set", "predict.overlays=false"]) == 0
        images = json.loads((tmp_path / runtime / "predictions.json").read_text())["images"]
        results[runtime] = {Path(e["path"]).name: e for e in images}
    assert results["torch"].keys() == results["openvino"].keys() and len(results["torch"]) == 6
    for name, expected in results["torch"].items():
        found = results["openvino"][name]
        assert found["score"] == pytest.approx(expected["score"], abs=1e-3), name
        assert (found["label"], found["level"]) == (expected["label"], expected["level"]), name

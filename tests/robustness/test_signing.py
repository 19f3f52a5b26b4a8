"""Signed model folders: with a key (``artifacts.key_file`` or ``OLED_AD_KEY_FILE``) every
manifest is signed with HMAC-SHA256, and a folder that is unsigned, re-signed without the key
or signed with another key is refused, naming its manifest; without a key, as before."""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from pathlib import Path

import pytest

import artifacts.io as artifact_io
from artifacts.io import (
    KEY_VARIABLE,
    MANIFEST_NAME,
    ArtifactError,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from tests.helpers import run_module
from tests.robustness.support import call, sets


def _key(path: Path) -> Path:
    path.write_text(secrets.token_hex(32))
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "weights.pt").write_bytes(b"weights")
    (path / "member.json").write_text("{}")
    return path


def _reseal(root: Path, changed: Path) -> None:
    """What someone who can write the folder, but has no key, can do: change a file and
    rewrite the checksums of every manifest below ``root`` that lists it."""
    changed.write_text('{"tampered": true}')
    for manifest_file in root.rglob(MANIFEST_NAME):
        folder = manifest_file.parent
        if folder not in changed.parents:
            continue
        manifest = json.loads(manifest_file.read_text())
        name = changed.relative_to(folder).as_posix()
        if name in manifest["sha256"]:
            manifest["sha256"][name] = sha256_file(changed)
            manifest_file.write_text(json.dumps(manifest))


def test_a_key_signs_manifests_and_refuses_what_it_did_not_sign(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    unsigned = _folder(tmp_path / "unsigned")
    write_manifest(unsigned)
    key, other = _key(tmp_path / "key"), _key(tmp_path / "other-key")

    monkeypatch.setenv(KEY_VARIABLE, str(key))
    with pytest.raises(ArtifactError, match=f"{unsigned / MANIFEST_NAME}: not signed"):
        verify_manifest(unsigned)
    signed = _folder(tmp_path / "signed")
    write_manifest(signed)
    assert set(verify_manifest(signed)) == {"weights.pt", "member.json"}

    monkeypatch.setenv(KEY_VARIABLE, str(other))
    with pytest.raises(ArtifactError, match="does not match the key in .*other-key"):
        verify_manifest(signed)
    monkeypatch.setenv(KEY_VARIABLE, str(key))
    _reseal(signed, signed / "member.json")
    with pytest.raises(ArtifactError, match=f"{signed / MANIFEST_NAME}: the signature"):
        verify_manifest(signed)

    # Without a key: checksums only, signed or not, said once in the log.
    monkeypatch.delenv(KEY_VARIABLE)
    monkeypatch.setattr(artifact_io, "_said_unsigned", False)
    assert verify_manifest(signed) and verify_manifest(unsigned)


def test_without_a_key_the_log_says_folders_are_unsigned_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    monkeypatch.setattr(artifact_io, "_said_unsigned", False)
    folder = _folder(tmp_path / "folder")
    with caplog.at_level(logging.INFO, logger="artifacts.io"):
        write_manifest(folder)
        verify_manifest(folder)
    assert [r.message for r in caplog.records].count(
        f"model folders are not signed: set artifacts.key_file (or {KEY_VARIABLE}) to sign "
        "and verify them"
    ) == 1


@pytest.mark.parametrize("content", ["", "short"])
def test_a_key_file_that_is_missing_or_too_short_is_named(tmp_path, content):
    from artifacts.io import use_key_file

    with pytest.raises(ArtifactError, match="missing-key: cannot read the signing key"):
        use_key_file(tmp_path / "missing-key")
    (tmp_path / "key").write_text(content)
    with pytest.raises(ArtifactError, match=f"{tmp_path / 'key'}: a signing key of"):
        use_key_file(tmp_path / "key")


@pytest.mark.slow
def test_signatures_hold_through_save_export_and_predict(tiny_run, tmp_path, monkeypatch, capsys):
    """The key set in the configuration: a hybrid saved with it, its export, and predict on
    both runtimes; the unsigned hybrid of the run, and a signed one changed without the key,
    are refused by predict, which names the manifest."""
    from fusion.hybrid import Hybrid
    from pipelines import predict

    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    key = _key(tmp_path / "plant.key")
    with_key = sets(f"artifacts.key_file={key}")
    images = sorted(p for p in (tiny_run["root"] / "cache").rglob("*.png") if "test" in p.parts)
    code, _, err = call(
        predict.main,
        ["--hybrid", tiny_run["hybrid"], images[0], "--out", tmp_path / "p0", *with_key],
        capsys,
    )
    assert code == 1 and f"{tiny_run['hybrid']}" in err and "not signed" in err

    monkeypatch.setenv(KEY_VARIABLE, str(key))
    signed = tmp_path / "signed-hybrid"
    monkeypatch.delenv(KEY_VARIABLE)
    hybrid = Hybrid.load(tiny_run["hybrid"])
    monkeypatch.setenv(KEY_VARIABLE, str(key))
    hybrid.save(signed)
    monkeypatch.delenv(KEY_VARIABLE)
    # In its own interpreter, as a user runs it: torch.export starts autograd's threads, after
    # which this process could no longer fork workers that train.
    exported = run_module(
        "pipelines.export", "--hybrid", str(signed), "--format", "onnx", *with_key
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    for runtime in ("torch", "onnx"):
        argv = ["--hybrid", signed, images[0], "--out", tmp_path / runtime, "--runtime", runtime]
        assert call(predict.main, [*argv, *with_key], capsys)[0] == 0, runtime

    tampered = tmp_path / "tampered-hybrid"
    shutil.copytree(signed, tampered)
    _reseal(tampered, next(tampered.rglob("member.json")))
    code, _, err = call(
        predict.main, ["--hybrid", tampered, images[0], "--out", tmp_path / "p1", *with_key], capsys
    )
    assert code == 1 and "the signature does not match" in err and str(tampered) in err

"""Atomic writes, checksums and guarded loading of artifacts.

Every result and model the project writes goes through these functions: the bytes land in a
temporary file beside the target and are renamed over it, so a crash or a full disk never leaves
a half-written file that a later run would trust. Pickled artifacts (joblib) are only loaded from
a folder whose SHA-256 manifest verifies.

A manifest proves a folder whole, not where it came from: anyone who can write the folder can
rewrite it. With a secret key (``artifacts.key_file``, or the file ``OLED_AD_KEY_FILE`` names)
every manifest is signed with HMAC-SHA256 (RFC 2104) over its entries, and a folder that is
unsigned, or signed with another key, is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.sha256.json"
# The file holding the signing key; pipelines set it from ``artifacts.key_file`` for themselves
# and the processes they start.
KEY_VARIABLE = "OLED_AD_KEY_FILE"
MIN_KEY_BYTES = 32

log = logging.getLogger(__name__)


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, tampered with or outside the allowed folders."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    return atomic_write_chunks(path, [data])


def atomic_write_chunks(path: str | os.PathLike, chunks: Iterable[bytes]) -> Path:
    """Write ``chunks`` one after another to ``path`` through a temporary file and a rename: a
    large file (a panel's overlay or map) streamed as it is made, never whole in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:
            # A full disk says "No space left on device" without saying where: name the file.
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_dir(path.parent)
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``, glibc 2.28+); False
    where the platform or the filesystem cannot, having changed nothing."""
    rename_exchange = getattr(_libc(), "renameat2", None)
    if rename_exchange is None:
        return False
    if rename_exchange(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
        error = ctypes.get_errno()
        if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            return False
        raise OSError(error, os.strerror(error), str(b))
    return True


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it into place only when the block succeeds.

    An existing folder at ``path`` is replaced; it stays untouched if the block raises. Readers
    never see a half-built folder, and ``path`` is never missing: a kill at any point leaves the
    old folder or the new one, complete. The swap is one ``renameat2(RENAME_EXCHANGE)``. Where
    the platform or filesystem has no such call, ``path`` is made a symbolic link to a hidden
    sibling ``.<name>.<random>`` and replaced link for link (``os.replace`` of a link is one
    step too); a real folder made elsewhere is then moved aside first, the one moment that
    path is missing. A kill can leave hidden ``.<name>.*`` siblings behind, never in the way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fault_point("atomic_folder_built")
        if path.is_symlink():
            _swap_link(path, tmp)
        elif not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):  # tmp now holds the old folder
            _fsync_dir(path.parent)
            fault_point("atomic_folder_swapped")
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            _swap_link(path, tmp)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_link(path: Path, built: Path) -> None:
    """Point the link ``path`` (or a new one) at ``built``, renamed to a hidden version folder;
    the folder the link named before is removed."""
    previous = path.resolve() if path.is_symlink() else None
    version = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.replace(built, version)
    link = version.with_name(f"{version.name}.link")
    os.symlink(version.name, link)
    os.replace(link, path)
    _fsync_dir(path.parent)
    fault_point("atomic_folder_swapped")
    if previous is not None and previous.parent == path.parent.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def fault_point(step: str) -> None:
    """Kill this process with SIGKILL when ``OLED_AD_KILL_AT`` names ``step`` (crash tests).

    With ``OLED_AD_KILL_SCOPE=group`` the whole process group dies (a pipeline and the job
    processes it started), as when an operator or the OOM killer stops a run.
    """
    if os.environ.get("OLED_AD_KILL_AT") == step:
        if os.environ.get("OLED_AD_KILL_SCOPE") == "group":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV of ``rows`` (dicts) with a header: ``columns`` in that order (keys a row lacks are
    empty, keys not named are left out), or every key the rows have, in first-seen order."""
    import csv

    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def atomic_write_csv(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
) -> Path:
    """``csv_text(rows, columns)`` written atomically to ``path``."""
    return atomic_write_text(path, csv_text(rows, columns))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    )


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths: the common non-JSON values in results.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into memory, then an atomic write."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a torch file with ``weights_only=True``; errors name the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupted, truncated or not a torch file
        raise ArtifactError(f"cannot load weights file {path}: {exc}") from exc


def atomic_joblib_dump(obj: Any, path: str | os.PathLike) -> Path:
    import joblib

    buffer = io.BytesIO()
    joblib.dump(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_id(folder: str | os.PathLike) -> str:
    """What identifies a saved folder (a hybrid, its export): the SHA-256 of its manifest, which
    lists every file's."""
    return sha256_file(Path(folder) / MANIFEST_NAME)


def use_key_file(path: str | os.PathLike | None) -> None:
    """Sign and verify manifests with the key in ``path`` from now on, in this process and the
    processes it starts (None: as the environment says). The key is checked now."""
    if path:
        read_key(path)
        os.environ[KEY_VARIABLE] = str(Path(path).resolve())


def read_key(path: str | os.PathLike) -> bytes:
    """The signing key in ``path`` (its bytes, surrounding whitespace left out)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ArtifactError(
            f"{path}: cannot read the signing key ({exc.strerror}); artifacts.key_file or "
            f"{KEY_VARIABLE} names it"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise ArtifactError(
            f"{path}: a signing key of {len(key)} bytes is too short; write at least "
            f'{MIN_KEY_BYTES} random bytes into it, e.g. python -c "import secrets; '
            f'print(secrets.token_hex(32))" > {path}'
        )
    return key


_said_unsigned = False


def _signing_key() -> tuple[bytes, str] | None:
    """The configured key and the file it came from; None (said once in the log) without one."""
    global _said_unsigned
    path = os.environ.get(KEY_VARIABLE)
    if path:
        return read_key(path), path
    if not _said_unsigned:
        log.info(
            "model folders are not signed: set artifacts.key_file (or %s) to sign and verify them",
            KEY_VARIABLE,
        )
        _said_unsigned = True
    return None


def _signature(key: bytes, entries: Mapping[str, str]) -> str:
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def write_manifest(
    folder: str | os.PathLike, files: Iterable[str | os.PathLike] | None = None
) -> Path:
    """Write ``folder/manifest.sha256.json`` listing the SHA-256 of every file (or of ``files``),
    signed where a key is configured."""
    folder = Path(folder)
    if files is None:
        files = sorted(
            p.relative_to(folder)
            for p in folder.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp")
        )
    entries = {}
    for f in files:
        f = Path(f)
        f = f if f.is_absolute() else folder / f
        entries[f.relative_to(folder).as_posix()] = sha256_file(f)
    manifest: dict[str, Any] = {"sha256": entries}
    signing = _signing_key()
    if signing is not None:
        manifest["hmac_sha256"] = _signature(signing[0], entries)
    return atomic_write_json(folder / MANIFEST_NAME, manifest)


def verify_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """Check every file listed in the folder's manifest, and its signature where a key is
    configured; raise ``ArtifactError`` naming the first file that is missing or whose checksum
    differs, or the manifest that is unsigned or signed otherwise. Returns its entries."""
    return VerifiedFolder.open(folder).verify()


def load_joblib_verified(path: str | os.PathLike, root: str | os.PathLike) -> Any:
    """Load a joblib file only if it lies inside ``root`` and ``root``'s manifest verifies it."""
    path, root = Path(path).resolve(), Path(root).resolve()
    if root not in path.parents:
        raise ArtifactError(f"refusing to load {path}: it is outside the artifact folder {root}")
    return VerifiedFolder.open(root).load_joblib(path.relative_to(root).as_posix())


class VerifiedFolder:
    """An artifact folder read through its manifest, each file checked once.

    Opening it checks the manifest (and its signature, where a key is configured), that every
    entry lies inside the folder and that every listed file is there. Each file is then checked
    as it is read: its SHA-256 is taken of the very bytes that are returned, so nothing changes
    between the check and the use, and a pickle is unpickled only after its bytes matched.
    ``verify`` checks the listed files not read yet; ``within`` reads a sub-folder (a member's,
    inside a hybrid's) through the same manifest.

    ``VerifiedFolder.open(folder)`` checks the manifest and returns the folder to read.

    Args:
        folder: the folder the entries are relative to.
        manifest: the manifest they come from (named in errors).
        entries: relative path -> expected SHA-256.
        identity: the manifest's SHA-256 (``manifest_id``), of the bytes the entries were read
            from.
        prefix, checked: a view's folder relative to the manifest, and the set of what was
            checked that it shares with the folder it is a view of (``within``).
    """

    def __init__(
        self,
        folder: Path,
        manifest: Path,
        entries: Mapping[str, str],
        identity: str,
        prefix: str = "",
        checked: set[str] | None = None,
    ) -> None:
        self.folder, self.manifest, self.entries = Path(folder), Path(manifest), dict(entries)
        self.identity = identity
        # What was checked, by path relative to the manifest: shared with the views ``within``
        # makes (``prefix``: a view's folder in the manifest's terms).
        self.prefix = prefix
        self.checked: set[str] = set() if checked is None else checked

    @classmethod
    def open(cls, folder: str | os.PathLike) -> VerifiedFolder:
        """The folder ``folder`` as its manifest ``MANIFEST_NAME`` lists it, once the manifest
        and its signature are checked and every listed file is there."""
        folder = Path(folder)
        manifest = folder / MANIFEST_NAME
        return cls(folder, manifest, *_manifest_entries(folder, manifest))

    def within(self, sub: str) -> VerifiedFolder:
        """The files under ``sub`` (a relative folder), checked against this manifest."""
        prefix = sub.rstrip("/") + "/"
        entries = {
            rel[len(prefix) :]: digest
            for rel, digest in self.entries.items()
            if rel.startswith(prefix)
        }
        return VerifiedFolder(
            self.folder / sub,
            self.manifest,
            entries,
            self.identity,
            self.prefix + prefix,
            self.checked,
        )

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of the listed file ``rel``, after their SHA-256 matched the manifest."""
        if rel not in self.entries:
            raise ArtifactError(
                f"refusing to load {self.folder / rel}: it is not listed in {self.manifest}"
            )
        data = (self.folder / rel).read_bytes()
        self._check(rel, hashlib.sha256(data).hexdigest())
        return data

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except ValueError as exc:
            raise ArtifactError(f"{self.folder / rel}: not JSON ({exc})") from exc

    def load_joblib(self, rel: str) -> Any:
        import joblib

        return joblib.load(io.BytesIO(self.read_bytes(rel)))

    def load_torch(self, rel: str, map_location: Any = "cpu") -> Any:
        """A torch file, with ``weights_only=True``; errors name the file."""
        import torch

        data = self.read_bytes(rel)
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # truncated before the manifest was written, or not torch's
            raise ArtifactError(f"cannot load weights file {self.folder / rel}: {exc}") from exc

    def verify(self) -> dict[str, str]:
        """Check every listed file not read yet; returns the entries."""
        for rel in self.entries:
            if self.prefix + rel not in self.checked:
                self._check(rel, sha256_file(self.folder / rel))
        return dict(self.entries)

    def _check(self, rel: str, actual: str) -> None:
        expected = self.entries[rel]
        if actual != expected:
            raise ArtifactError(
                f"{self.folder / rel}: SHA-256 {actual[:12]}… does not match the manifest "
                f"({expected[:12]}…); the artifact was modified"
            )
        self.checked.add(self.prefix + rel)


def _manifest_entries(folder: Path, manifest: Path) -> tuple[dict[str, str], str]:
    """The manifest's entries and its own SHA-256, after its signature (where a key is
    configured), each entry's place inside ``folder`` and each listed file's presence were
    checked."""
    if not manifest.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST_NAME}; the artifact is incomplete or foreign")
    try:
        raw = manifest.read_bytes()
        content = json.loads(raw)
        entries = content["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{manifest}: unreadable manifest ({exc})") from exc
    signing = _signing_key()
    if signing is not None:
        key, key_file = signing
        signed = content.get("hmac_sha256")
        if not isinstance(signed, str):
            raise ArtifactError(
                f"{manifest}: not signed, and a signing key is configured ({key_file}); "
                "refusing it. Rebuild or re-export the folder with the key set"
            )
        if not hmac.compare_digest(signed, _signature(key, entries)):
            raise ArtifactError(
                f"{manifest}: the signature does not match the key in {key_file}; the folder "
                "was changed or signed with another key. Refusing it"
            )
    root = folder.resolve()
    for rel in entries:
        target = (folder / rel).resolve()
        if root not in target.parents:
            raise ArtifactError(f"{manifest}: entry {rel!r} points outside {folder}")
        if not target.is_file():
            raise ArtifactError(f"{folder}: file {rel} listed in the manifest is missing")
    return entries, hashlib.sha256(raw).hexdigest()

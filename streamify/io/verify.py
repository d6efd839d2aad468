"""``streamify verify``: check an artifact's files against the sha256 its manifest recorded."""

from __future__ import annotations

from pathlib import Path

from streamify.errors import InputError
from streamify.io.artifact import FILES_KEY, manifest_digest
from streamify.io.manifest import MANIFEST_NAME, read_manifest
from streamify.io.safetensors_file import read_header
from streamify.io.source import check_links, sha256_file

_UNRECORDED = frozenset({MANIFEST_NAME, "README.md"})  # the manifest itself, and the card made from it
_RECREATE = "the file is damaged or was changed: restore it from a good copy, or re-create the artifact"


def verify_artifact(folder: Path) -> dict:
    """Check every file the manifest of ``folder`` records (size, then sha256), and the manifest's own stamp.

    Raises :class:`InputError` (exit 3) naming the first file that does not
    match; returns ``{"artifact", "files", "bytes"}`` when all do.
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder", "pass the folder streamify wrote (with streamify.json)")
    manifest = read_manifest(folder)
    if manifest is None:
        raise InputError(
            f"{folder}: not a streamify artifact (no {MANIFEST_NAME}), so there is nothing to verify against",
            "verify folders that streamify wrote",
        )
    recorded = manifest.get(FILES_KEY)
    if not isinstance(recorded, dict) or not recorded:
        raise InputError(
            f"{folder / MANIFEST_NAME}: records no file hashes (written by an older streamify)",
            "re-create the artifact with this version to be able to verify it",
        )
    check_links(folder)  # nothing outside the folder is read, not even to hash it
    unrecorded = [p.name for p in sorted(folder.iterdir()) if p.name not in recorded and p.name not in _UNRECORDED]
    if unrecorded:
        raise InputError(f"{folder / unrecorded[0]}: a file the manifest does not record", _RECREATE)
    total = 0
    for name, entry in sorted(recorded.items()):
        path = folder / name
        if Path(name).name != name or not path.is_file() or not isinstance(entry, dict):
            raise InputError(f"{path}: recorded in the manifest but missing (or the record is malformed)", _RECREATE)
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise InputError(f"{path}: {size} bytes, the manifest recorded {entry.get('bytes')}", _RECREATE)
        if sha256_file(path) != entry.get("sha256"):
            raise InputError(f"{path}: sha256 does not match the manifest", _RECREATE)
        total += size
    digest = manifest_digest(manifest)
    for path in sorted(folder.glob("*.safetensors")):
        stamp = read_header(path).get("__metadata__", {}).get("streamify_manifest_sha256")
        if stamp != digest:
            raise InputError(
                f"{folder / MANIFEST_NAME}: does not match the stamp in {path.name} (the manifest was edited)",
                _RECREATE,
            )
    return {"artifact": str(folder), "files": len(recorded), "bytes": total}

"""The runtime manifest ``kvcompress.json``: schema version, source, per-layer settings, checksums."""

from __future__ import annotations

import json
from pathlib import Path

from kvcompress import __version__
from kvcompress.errors import KVCompressError
from kvcompress.sources import sha256_file

MANIFEST_NAME = "kvcompress.json"
SCHEMA_VERSION = 1


def write_manifest(folder: Path, manifest: dict) -> None:
    """Add checksums of every file in ``folder`` and write the manifest beside them."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest = {"schema_version": SCHEMA_VERSION, "kvcompress_version": __version__, **manifest,
                "files": {str(p.relative_to(folder)): sha256_file(p) for p in files}}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """Read and check a checkpoint's manifest.

    Parameters
    ----------
    folder : str or Path
        An exported checkpoint.
    verify : bool
        Also recompute every file's sha256 against the manifest.

    Raises
    ------
    KVCompressError
        Missing folder or manifest, newer schema, missing or tampered file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise KVCompressError(f"checkpoint not found: {folder}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise KVCompressError(f"{folder} has no {MANIFEST_NAME}; not a kvcompress checkpoint (run `kvcompress export`)")
    try:
        manifest = json.loads(path.read_text())
        version = int(manifest["schema_version"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise KVCompressError(f"corrupt manifest {path}: {e}") from None
    if version > SCHEMA_VERSION:
        raise KVCompressError(f"manifest schema_version {version} is newer than this kvcompress supports "
                              f"({SCHEMA_VERSION}); upgrade kvcompress")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file():
                raise KVCompressError(f"checkpoint file missing: {name}")
            if sha256_file(file) != digest:
                raise KVCompressError(f"checksum mismatch for {name}: the checkpoint is corrupt or was modified")
    return manifest

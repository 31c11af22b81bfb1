"""The runtime manifest ``kvcompress.json``: schema version, source, per-layer settings, checksums.

Schema 2 adds ``manifest_sha256``, the sha256 of the manifest's own canonical JSON (sorted keys, compact,
without that field), so an edited manifest fails verification like an edited weight file does. Schema 1
manifests (kvcompress 0.1.0) have no such field and still load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kvcompress import __version__
from kvcompress.errors import KVCompressError
from kvcompress.methods.lowrank import tensor_shapes
from kvcompress.plan import Plan
from kvcompress.sources import ModelSpec, sha256_file

MANIFEST_NAME = "kvcompress.json"
SCHEMA_VERSION = 2
SELF_CHECKSUM = "manifest_sha256"


def _self_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SELF_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    """Add checksums of every file in ``folder`` and of the manifest itself, and write it beside them."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest = {"schema_version": SCHEMA_VERSION, "kvcompress_version": __version__, **manifest,
                "files": {str(p.relative_to(folder)): sha256_file(p) for p in files}}
    manifest[SELF_CHECKSUM] = _self_digest(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint folder: its manifest, the plan the manifest holds, and its model config."""

    manifest: dict
    plan: Plan
    config: dict

    @property
    def spec(self) -> ModelSpec:
        """The model's shapes, from ``config``."""
        return ModelSpec.from_config(self.config)


def read_checkpoint(folder: str | Path, verify: bool = True) -> Checkpoint:
    """Read and check a checkpoint's manifest, plan and config (each read once).

    Parameters
    ----------
    folder : str or Path
        An exported checkpoint.
    verify : bool
        Also check the manifest's own checksum and recompute every file's sha256 against it. Its
        per-layer settings are always checked against the shapes of the weights (read from the
        safetensors headers only), so a manifest that does not fit them is refused before any load.

    Raises
    ------
    KVCompressError
        Missing folder or manifest, newer schema, edited manifest, missing or tampered file, settings that
        do not match the weights.
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
        if version >= 2 and manifest.get(SELF_CHECKSUM) != _self_digest(manifest):
            raise KVCompressError(f"checksum mismatch for {MANIFEST_NAME}: the manifest was edited or is corrupt")
        for name, digest in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file():
                raise KVCompressError(f"checkpoint file missing: {name}")
            if sha256_file(file) != digest:
                raise KVCompressError(f"checksum mismatch for {name}: the checkpoint is corrupt or was modified")
    checkpoint = Checkpoint(manifest, Plan.from_manifest(manifest), read_config(folder))
    check_against_weights(folder, checkpoint.plan, checkpoint.spec)
    return checkpoint


def read_config(folder: str | Path) -> dict:
    """A checkpoint's ``config.json``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise KVCompressError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KVCompressError(f"corrupt {path}: {e}") from None


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise KVCompressError(f"{folder} holds pickle weights; kvcompress loads only safetensors")
        raise KVCompressError(f"no safetensors weights in {folder}")
    shapes = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                shapes |= {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        except Exception as e:
            raise KVCompressError(f"corrupt safetensors file {shard.name}: {e}") from None
    return shapes


def check_against_weights(folder: Path, plan: Plan, spec: ModelSpec) -> None:
    """Check that a manifest's plan describes the weights beside it: one entry per decoder layer, in order,
    with the ranks and value layout that the factorized tensors have.

    Raises
    ------
    KVCompressError
        The first disagreement, naming the layer and the setting.
    """
    shapes = weight_shapes(folder)
    indices = [lay.layer for lay in plan.layers]
    if indices != list(range(spec.num_layers)):
        raise KVCompressError(f"the manifest lists {len(indices)} layers ({_listed(indices)}); the model has "
                              f"{spec.num_layers} (0-{spec.num_layers - 1})")
    if plan.head_group < 1 or spec.num_kv_heads % plan.head_group:
        raise KVCompressError(f"the manifest's head_group {plan.head_group} does not divide the "
                              f"{spec.num_kv_heads} KV heads")
    for lay in plan.layers:
        rank_k, rank_v = lay.keys.rank, lay.values.rank
        for name, shape in tensor_shapes(spec, plan, lay).items():
            if name not in shapes:
                raise KVCompressError(f"layer {lay.layer}: the weights have no {name}")
            if shapes[name] != shape:
                raise KVCompressError(f"layer {lay.layer}: {name} is {list(shapes[name])} in the weights, but the "
                                      f"manifest's rank_k {rank_k} / rank_v {rank_v} / value_folded "
                                      f"{lay.value_folded} mean {list(shape)}")


def _listed(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:8]))
    return shown + ", ..." if len(indices) > 8 else shown

"""`data/dataset_info.json`: registered dataset names, their files and the sha1 of the full published file.

A registered name resolves to, in this order: the full file if the user put it in the dataset folder (checked
against its sha1), the subset shipped with rlhf_ds, or an error that says which file to put where.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from rlhf_ds.errors import UserError

logger = logging.getLogger(__name__)

FORMATS = ("ranked", "pairwise", "dialogue", "alpaca", "qa")


@dataclass(frozen=True)
class DatasetSource:
    name: str  # registered name, or the path as given
    path: Path
    format: str | None  # None: detect from the file
    note: str = ""  # e.g. "shipped subset: first 1,095 records"


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_registry(dataset_dir: str | Path) -> dict[str, dict]:
    info = Path(dataset_dir) / "dataset_info.json"
    if not info.is_file():
        raise UserError(f"{info} not found: --dataset_dir must be a folder with a dataset_info.json")
    try:
        registry = json.loads(info.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{info}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    for name, entry in registry.items():
        if not isinstance(entry, dict) or "file_name" not in entry:
            raise UserError(f"{info}: entry {name!r} needs at least a \"file_name\"")
        if entry.get("format", "ranked") not in FORMATS:
            raise UserError(f"{info}: entry {name!r} has format {entry['format']!r}; use one of {', '.join(FORMATS)}")
    return registry


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".json", ".jsonl")) or "/" in spec or spec.startswith(".")


def resolve(spec: str, dataset_dir: str | Path, dataset_format: str | None = None) -> DatasetSource:
    """Turn one `--dataset` item (a registered name or a file path) into a file to read."""
    if dataset_format is not None and dataset_format not in FORMATS:
        raise UserError(f"--dataset_format {dataset_format!r}: choose one of {', '.join(FORMATS)}")
    registry = load_registry(dataset_dir)
    if spec in registry:
        return _resolve_registered(spec, registry[spec], Path(dataset_dir))
    if _looks_like_path(spec):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--dataset {spec}: file not found")
        return DatasetSource(spec, path, dataset_format)
    known = ", ".join(sorted(registry))
    raise UserError(f"unknown dataset {spec!r}: registered names are {known}; "
                    f"or pass a .json/.jsonl file path")


def _resolve_registered(name: str, entry: dict, dataset_dir: Path) -> DatasetSource:
    fmt = entry.get("format", "ranked")
    full = dataset_dir / entry["file_name"]
    if full.is_file():
        expected = entry.get("file_sha1")
        if expected:
            actual = file_sha1(full)
            if actual != expected:
                raise UserError(
                    f"{full} has sha1 {actual}, but dataset {name!r} is registered with the published file's sha1 "
                    f"{expected}. Replace it with the published file, or pass your own copy as "
                    f"--dataset path/to/your_file.json (moved out of {dataset_dir}).")
        return DatasetSource(name, full, fmt, "full file")
    subset = entry.get("shipped_subset")
    if subset and (dataset_dir / subset).is_file():
        note = f"shipped subset ({entry.get('subset_note', 'partial')}); put the full file at {full} to use it"
        return DatasetSource(name, dataset_dir / subset, fmt, note)
    sha = f" (sha1 {entry['file_sha1']})" if entry.get("file_sha1") else ""
    raise UserError(
        f"dataset {name!r} is registered but its file is not here: put {entry['file_name']}{sha} "
        f"at {full} — {entry.get('source', 'see data/NOTICE.md')} — or pick another --dataset")

"""Benchmark datasets, generated once and cached under tests/.work/bench-data/ (gitignored).

- CT: 500 slices of 512x512, 16-bit, explicit VR LE (about 0.5 MB each), the harness's thorax phantom
  (smooth anatomy, correlated noise);
- MR: 200 slices of 256x256 (the same phantom, MR Image Storage);
- two multi-frame instances of about 50 MB (100 frames of 512x512, 16-bit).

`--quick` uses smaller sets (cached separately).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pydicom
from pydicom.uid import MRImageStorage

from harness import data
from harness.data import Instance

WORK = Path(__file__).resolve().parents[1] / ".work" / "bench-data"

FULL = {"ct": (500, 512), "mr": (200, 256), "mf": (2, 100)}
QUICK = {"ct": (40, 512), "mr": (20, 256), "mf": (1, 10)}


def _save(manifest: Path, sets: dict[str, list[Instance]]) -> None:
    manifest.write_text(
        json.dumps({k: [{**asdict(i), "path": str(i.path)} for i in v] for k, v in sets.items()}, indent=1)
    )


def _load(manifest: Path) -> dict[str, list[Instance]] | None:
    try:
        raw = json.loads(manifest.read_text())
        sets = {k: [Instance(**{**i, "path": Path(i["path"])}) for i in v] for k, v in raw.items()}
    except (OSError, ValueError, TypeError):
        return None
    if all(i.path.is_file() for v in sets.values() for i in v):
        return sets
    return None


def _to_mr(study: data.Study) -> list[Instance]:
    """Relabels the phantom series as MR (MR Image Storage), in place."""
    out = []
    for inst in study.instances:
        ds = pydicom.dcmread(inst.path)
        ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        for kw in ("KVP", "RescaleIntercept", "RescaleSlope", "RescaleType"):
            if kw in ds:
                delattr(ds, kw)
        ds.StudyDescription = "MR (generated phantom)"
        path = inst.path.with_name(inst.path.name.replace("CT", "MR"))
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        inst.path.unlink()
        out.append(Instance(path=path, name=path.name, sop_class_uid=MRImageStorage,
                            sop_instance_uid=inst.sop_instance_uid, study_instance_uid=inst.study_instance_uid,
                            transfer_syntax_uid=inst.transfer_syntax_uid, description="generated MR slice"))
    return out


def datasets(quick: bool = False, log=print) -> dict[str, list[Instance]]:
    """{"ct": [...], "mr": [...], "mf": [...], "real": [...]}, generated on first use and cached."""
    spec = QUICK if quick else FULL
    root = WORK / ("quick" if quick else "full")
    manifest = root / "manifest.json"
    cached = _load(manifest)
    if cached is not None:
        return cached
    log(f"Generating benchmark datasets under {root} (once; cached for later runs) ...")
    root.mkdir(parents=True, exist_ok=True)
    ct_n, ct_size = spec["ct"]
    ct = data.generate_ct_study(root / "ct", slices=ct_n, size=ct_size, seed=4001, patient_id="BENCH-CT").instances
    mr_n, mr_size = spec["mr"]
    mr = _to_mr(data.generate_ct_study(root / "mr", slices=mr_n, size=mr_size, seed=4002, patient_id="BENCH-MR"))
    mf_n, frames = spec["mf"]
    mf = [data.generate_large_instance(root / "mf" / f"MF{k + 1}.dcm", frames=frames, size=512, seed=4003 + k)
          for k in range(mf_n)]
    real = data.real_world_files(root / "real")
    sets = {"ct": ct, "mr": mr, "mf": mf, "real": real}
    _save(manifest, sets)
    return sets


def total_bytes(instances: list[Instance]) -> int:
    return sum(i.path.stat().st_size for i in instances)

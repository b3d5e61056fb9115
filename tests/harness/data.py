"""Test data: a generated CT study with realistic pixels, and real-world files bundled with pydicom.

Only files that ship inside the pydicom wheel are used (pydicom can download more test files from the
internet, which these tests must never do).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Our test UID root (2.25 = UUID-derived, so generated UIDs never collide with real ones).
UID_PREFIX = None  # pydicom's generate_uid() then makes 2.25.<uuid> UIDs


@dataclass(frozen=True)
class Instance:
    path: Path
    name: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    description: str = ""


@dataclass(frozen=True)
class Study:
    study_instance_uid: str
    series_instance_uid: str
    instances: list[Instance]

    @property
    def paths(self) -> list[Path]:
        return [i.path for i in self.instances]


# -- the generated CT study ------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Correlated (low-pass filtered) Gaussian noise, unit variance: CT noise is not white."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    out = np.real(np.fft.ifft2(np.fft.fft2(white) * kernel))
    return out / (out.std() + 1e-9)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def ct_slice_hu(z: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """One axial slice of a smooth thorax-like phantom in Hounsfield units; z in [0, 1] head to feet."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    s = size / 256
    img = np.full((size, size), -1000.0, dtype=np.float32)  # air
    # Body: ellipse whose size varies smoothly along z, with a subcutaneous fat layer.
    body_rx = (110 + 8 * np.sin(np.pi * z)) * s
    body_ry = (80 + 6 * np.sin(np.pi * z)) * s
    img[_ellipse(yy, xx, c + 5 * s, c, body_ry, body_rx)] = -90.0  # fat
    img[_ellipse(yy, xx, c + 5 * s, c, body_ry - 8 * s, body_rx - 8 * s)] = 40.0  # soft tissue
    # Lungs grow and shrink along z.
    lung = max(0.0, np.sin(np.pi * min(1.0, z * 1.3)))
    if lung > 0.05:
        for side in (-1, 1):
            img[_ellipse(yy, xx, c - 5 * s, c + side * 45 * s, 55 * s * lung + 5, 32 * s * lung + 3)] = -820.0
    # Heart in the middle third, liver in the lower part.
    if 0.3 < z < 0.7:
        img[_ellipse(yy, xx, c + 5 * s, c + 12 * s, 30 * s, 35 * s)] = 45.0
    if z > 0.6:
        img[_ellipse(yy, xx, c + 10 * s, c - 35 * s, 45 * s * (z - 0.4), 50 * s * (z - 0.4))] = 60.0
    # Spine: vertebral body (bone) with a marrow core, and an aorta in front of it.
    img[_ellipse(yy, xx, c + 55 * s, c, 14 * s, 14 * s)] = 700.0
    img[_ellipse(yy, xx, c + 55 * s, c, 8 * s, 8 * s)] = 250.0
    img[_ellipse(yy, xx, c + 30 * s, c + 12 * s, 9 * s, 9 * s)] = 180.0
    # Smooth gradient (beam hardening-like) and correlated noise.
    img += 15.0 * (yy / size - 0.5)
    img += 12.0 * _smooth_noise(rng, (size, size), sigma=1.5)
    return img


def generate_ct_study(
    out_dir: Path,
    slices: int = 200,
    size: int = 256,
    seed: int = 1234,
    patient_id: str = "PASS-TEST-001",
    patient_name: str = "Test^Phantom",
) -> Study:
    """Writes `slices` CT Part-10 files (explicit VR little endian, 16-bit) of one study/series."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    accession = f"ACC{seed:06d}"
    thickness = 1.25
    instances: list[Instance] = []
    for i in range(slices):
        z = i / max(1, slices - 1)
        hu = ct_slice_hu(z, size, rng)
        stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)
        sop_uid = generate_uid()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = "Passerelle Test Phantom"
        ds.InstitutionName = "Test Hospital"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT THORAX-ABDOMEN (generated phantom)"
        ds.SeriesDescription = f"Axial {thickness} mm"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.SliceThickness = thickness
        ds.KVP = 120
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-160.0, -160.0, -i * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = -i * thickness
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.PixelSpacing = [320.0 / size, 320.0 / size]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()

        path = out_dir / f"CT{i + 1:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        instances.append(
            Instance(
                path=path,
                name=path.name,
                sop_class_uid=CTImageStorage,
                sop_instance_uid=sop_uid,
                study_instance_uid=study_uid,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                description="generated CT slice",
            )
        )
    return Study(study_instance_uid=study_uid, series_instance_uid=series_uid, instances=instances)


# -- real-world files bundled with pydicom ---------------------------------------------------------------

# Bundled files left out: the JPEGLSNearLossless_* and SC_rgb_jls_* files have no Study Instance UID (a
# PACS rejects them), files without a File Meta header (no_meta, rtstruct, *NoMeta) or with broken meta
# (meta_missing_tsyntax, UN_sequence, ...), rtdose_rle*.dcm (every element encoded as UN; dcmtk cannot
# find its UIDs) and badVR.dcm (invalid values).
#
# Several bundled files share a SOP Instance UID (the MR_small_* variants, the SC_rgb_rle* family, ...).
# Different content under one UID would be a new version of one instance, not a new instance, so
# `real_world_files()` copies such a file and replaces its SOP Instance UID, byte for byte, with another
# UID of the same length: every other byte of the real-world encoding stays as it was.
REAL_WORLD_FILES: list[tuple[str, str]] = [
    ("CT_small.dcm", "CT, explicit VR little endian"),
    ("MR_small_implicit.dcm", "MR, implicit VR little endian"),
    ("rtplan.dcm", "RT Plan, implicit VR little endian"),
    ("rtdose.dcm", "RT Dose, implicit VR little endian, multi-frame (15)"),
    ("ExplVR_BigEnd.dcm", "US image, explicit VR big endian"),
    ("MR_small_bigendian.dcm", "MR, explicit VR big endian"),
    ("rtdose_expb.dcm", "RT Dose, explicit VR big endian, multi-frame (15)"),
    ("liver_expb_1frame.dcm", "Segmentation, explicit VR big endian"),
    ("image_dfl.dcm", "Secondary capture, deflated explicit VR little endian"),
    ("MR_small_RLE.dcm", "MR, RLE lossless"),
    ("SC_rgb_rle.dcm", "RGB secondary capture, RLE lossless"),
    ("SC_rgb_rle_16bit_2frame.dcm", "RGB secondary capture, RLE lossless, 16-bit, multi-frame (2)"),
    ("SC_rgb_rle_32bit_2frame.dcm", "RGB secondary capture, RLE lossless, 32-bit, multi-frame (2)"),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG lossless (process 14, selection value 1)"),
    ("SC_rgb_jpeg_dcmtk.dcm", "RGB secondary capture, JPEG baseline"),
    ("examples_ybr_color.dcm", "US multi-frame (30), JPEG baseline YBR"),
    ("JPEG-lossy.dcm", "JPEG extended (process 2 & 4)"),
    ("SC_jpeg_no_color_transform.dcm", "JPEG baseline without colour transform"),
    ("SC_rgb_dcmtk_+eb+cr.dcm", "JPEG baseline, dcmtk-encoded"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR, JPEG-LS lossless"),
    ("JPEG2000.dcm", "JPEG 2000"),
    ("MR_small_jp2klossless.dcm", "MR, JPEG 2000 lossless"),
    ("examples_jpeg2k.dcm", "US, JPEG 2000 lossless"),
    ("GDCMJ2K_TextGBR.dcm", "JPEG 2000 lossless, GB18030 text"),
    ("693_J2KI.dcm", "CT, JPEG 2000, odd-length pixel data"),
    ("SC_rgb_gdcm_KY.dcm", "RGB, JPEG 2000"),
    ("SC_rgb_small_odd.dcm", "RGB, odd rows/columns, explicit VR little endian"),
    ("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422 uncompressed"),
    ("test-SR.dcm", "Comprehensive SR"),
    ("reportsi.dcm", "Basic text SR"),
    ("waveform_ecg.dcm", "12-lead ECG waveform"),
    ("examples_overlay.dcm", "MR with overlay"),
    ("examples_palette.dcm", "US palette colour"),
    ("liver_1frame.dcm", "Segmentation, explicit VR little endian"),
]


def pydicom_test_files_dir() -> Path:
    return Path(pydicom.__file__).parent / "data" / "test_files"


def _same_length_uid(uid: str, taken: set[str]) -> str:
    """Another valid UID of the same length as `uid`, not in `taken` (changes the last component)."""
    head, _, last = uid.rpartition(".")
    width = len(last)
    for n in range(1, 10_000):
        candidate_last = str((int(last) + n) % (10**width))
        if len(candidate_last) != width:
            continue  # keep the length; a component may not start with 0
        candidate = f"{head}.{candidate_last}"
        if candidate not in taken:
            return candidate
    raise ValueError(f"No same-length replacement found for UID {uid}")


def _with_new_uid(src: Path, dst: Path, old: str, new: str) -> None:
    data = src.read_bytes()
    if data.count(old.encode()) < 1 or len(old) != len(new):
        raise ValueError(f"Cannot replace UID {old} in {src}")
    dst.write_bytes(data.replace(old.encode(), new.encode()))


def real_world_files(out_dir: Path) -> list[Instance]:
    """The bundled pydicom files of REAL_WORLD_FILES that are present and usable (Part-10 meta with a
    transfer syntax, a SOP Class, SOP Instance and Study Instance UID), copied to `out_dir`, each with a
    SOP Instance UID of its own (see above)."""
    base = pydicom_test_files_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out: list[Instance] = []
    seen: set[str] = set()
    for name, description in REAL_WORLD_FILES:
        src = base / name
        if not src.is_file():
            continue
        try:
            ds = pydicom.dcmread(src, stop_before_pixels=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
            sop_class = str(ds.SOPClassUID)
            sop_uid = str(ds.SOPInstanceUID)
            study_uid = str(ds.StudyInstanceUID)
        except Exception:  # noqa: BLE001 - a file we cannot use is skipped
            continue
        dst = out_dir / name
        if sop_uid in seen:
            if ts == "1.2.840.10008.1.2.1.99":
                continue  # deflated: the UID is not visible in the bytes
            new_uid = _same_length_uid(sop_uid, seen)
            _with_new_uid(src, dst, sop_uid, new_uid)
            check = pydicom.dcmread(dst, stop_before_pixels=True)
            assert str(check.SOPInstanceUID) == new_uid, f"UID replacement failed in {name}"
            sop_uid = new_uid
            description += " (SOP Instance UID replaced)"
        else:
            dst.write_bytes(src.read_bytes())
        seen.add(sop_uid)
        out.append(
            Instance(
                path=dst,
                name=name,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_uid,
                study_instance_uid=study_uid,
                transfer_syntax_uid=ts,
                description=description,
            )
        )
    return out


TRANSFER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}


def generate_large_instance(path: Path, frames: int = 512, size: int = 512, seed: int = 99) -> Instance:
    """One big multi-frame instance (frames x size x size x 16 bit; 256 MiB by default): Multi-frame
    Grayscale Word Secondary Capture, explicit VR little endian, pixel data of phantom slices."""
    from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage as SC_WORD

    rng = np.random.default_rng(seed)
    distinct = [np.clip(np.round(ct_slice_hu(k / 7, size, rng) + 1024), 0, 4095).astype(np.uint16) for k in range(8)]
    pixels = bytearray()
    for f in range(frames):
        pixels += distinct[f % 8].tobytes()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC_WORD
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SC_WORD
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Large"
    ds.PatientID = "PASS-TEST-LARGE"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(pixels)
    del pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return Instance(
        path=path,
        name=path.name,
        sop_class_uid=SC_WORD,
        sop_instance_uid=sop_uid,
        study_instance_uid=str(ds.StudyInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        description=f"{frames} frames of {size}x{size}, 16-bit",
    )

"""The README's first command, on a real radiograph stored the way a CR unit stores it.

    python examples/readme_first_command.py --data ../shared/data --out work/readme

Takes the first cxr-infection test radiograph whose infection lies in both lower zones
(target ``infection:left+right:lower``), writes it as ``chest.dcm``: a 2048-px, 12-bit
MONOCHROME1 CR file (the pixels upsampled from the 256-px export, inverted as MONOCHROME1
stores them), then runs ``mriseg predict chest.dcm --text "bilateral lower lobe opacity"``
with the shipped model in that folder and prints what the user sees. The mask is a DICOM SEG
referencing the radiograph. Then the same prompt on a normal test radiograph (``normal.dcm``,
"not found") and a prompt the model never learnt ("pleural effusion", refused, exit 1).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TARGET = "infection:left+right:lower"
PROMPT = "bilateral lower lobe opacity"


def write_cr(png: Path, out: Path, side: int = 2048, bits: int = 12) -> Path:
    """``png``'s pixels as a MONOCHROME1 CR image of ``side`` x ``side`` at ``bits`` bits."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    grey = np.asarray(Image.open(png).convert("L").resize((side, side), Image.Resampling.BILINEAR))
    top = 2**bits - 1
    stored = top - np.round(grey.astype(np.float64) / 255 * top)  # MONOCHROME1: white is 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CR", "DEMO", "Demo^Chest"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20261201", "120000", "1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.PatientBirthDate, ds.PatientSex, ds.Manufacturer = "", "O", "demo"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelSpacing = ["0.175", "0.175"]
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def _run(cmd: list[str], cwd: Path) -> int:
    shown = [f'"{w}"' if " " in w else w for w in cmd]
    print("$ " + " ".join(shown), flush=True)
    return subprocess.call(cmd, cwd=cwd, stderr=subprocess.STDOUT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("work/readme"))
    args = ap.parse_args()
    root = args.data / "cxr-infection"
    with open(root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    row = next(r for r in rows if r["target"] == TARGET)
    normal = next(r for r in rows if r["kind"] == "absent")
    args.out.mkdir(parents=True, exist_ok=True)
    dcm = write_cr(root / row["image"], args.out / "chest.dcm")
    write_cr(root / normal["image"], args.out / "normal.dcm")
    print(
        f"{row['image']} ({row['text']!r}) -> {dcm}; {normal['image']} -> normal.dcm",
        file=sys.stderr,
    )
    for name in ("chest_mask.dcm", "normal_mask.dcm"):  # this script's own earlier outputs
        (args.out / name).unlink(missing_ok=True)
    codes = [
        _run(["mriseg", "predict", "chest.dcm", "--text", PROMPT], args.out),
        _run(["mriseg", "predict", "normal.dcm", "--text", PROMPT, "--quiet"], args.out),
        _run(
            [
                "mriseg",
                "predict",
                "chest.dcm",
                "--text",
                "pleural effusion",
                "--out",
                "other",
                "--quiet",
            ],
            args.out,
        ),
    ]
    sys.exit(0 if codes[:2] == [0, 0] and codes[2] == 1 else 1)


if __name__ == "__main__":
    main()

"""An nnU-Net folder of the lgg-flair test patients' volumes, for ``mriseg evaluate``.

``lgg-flair/volumes`` holds the val and the test patients together (``imagesTs``,
``labelsTs``); this writes a folder with the test patients only (symbolic links, nothing
copied) and a ``texts.csv`` with the request evaluated on every slice:

    python examples/brain_test_volumes.py --data ../shared/data/lgg-flair --out work/brain-volumes
    mriseg evaluate --model brain-mri --data work/brain-volumes --split test
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/lgg-flair"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--text", default="FLAIR hyperintense lesion")
    args = ap.parse_args()
    with open(args.data / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == args.split]
    # image files are <patient>_<slice>.jpg
    patients = sorted({Path(r["image"]).stem.rsplit("_", 1)[0] for r in rows})
    for sub in ("imagesTs", "labelsTs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    n = 0
    for p in patients:
        pairs = (("imagesTs", f"{p}_0000.nii.gz"), ("labelsTs", f"{p}.nii.gz"))
        for sub, name in pairs:
            src = (args.data / "volumes" / sub / name).resolve()
            dst = args.out / sub / name
            if not src.is_file():
                raise SystemExit(f"error: {src}: missing")
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(src)
        n += 1
    with open(args.out / "texts.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerow(["foreground", args.text])
    print(f"{n} {args.split} volumes -> {args.out}")


if __name__ == "__main__":
    main()

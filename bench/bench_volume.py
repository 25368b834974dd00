"""A whole volume through ``mriseg predict`` with the model warm: seconds per volume, peak memory.

    python bench/bench_volume.py                                  # the shipped brain-mri model
    python bench/bench_volume.py --model runs/brain --slices 40 --threads 2
    python bench/bench_volume.py --volume flair.nii.gz

The model is loaded once (its load time reported apart); then the volume (``--volume``, else a
``--slices``-slice 256x256 NIfTI written from a bright ellipse on noise, 1 mm voxels) is
predicted end to end the way ``mriseg predict`` does it for each input: read, cut into axial
slices, decoded in batches, presence, resized back, thresholded and written as a NIfTI mask in
the source geometry. ``--warmup`` untimed runs, then ``--repeats`` timed ones (median reported).
Peak resident memory is the process's. Greedy decoding, one sample; the prompt is
``--text``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import (
    Reporter,
    add_common_args,
    args_dict,
    machine_info,
    process_peak_rss_mb,
    setup,
    time_it,
)

from mrisegcli.workflow.predict import PredictOptions, predict_batch
from mrisegcli.workflow.segmenter import Segmenter


def synthetic_volume(path: Path, slices: int, seed: int) -> None:
    """A FLAIR-like volume: a head-sized ellipse, a bright blob in some slices, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256]
    head = ((yy - 128) / 100.0) ** 2 + ((xx - 128) / 80.0) ** 2 < 1
    vol = np.zeros((256, 256, slices), np.float32)
    for k in range(slices):
        img = rng.normal(20, 5, (256, 256)) + 90 * head
        if slices // 3 <= k < 2 * slices // 3:
            img += 80 * (((yy - 100) / 20.0) ** 2 + ((xx - 150) / 25.0) ** 2 < 1)
        vol[..., k] = img
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS-like: x and y flipped, axial slices along z
    nib.save(nib.Nifti1Image(np.clip(vol, 0, 255).astype(np.uint8), affine), str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, batch=32, warmup=1, repeats=3)
    p.add_argument("--model", default="brain-mri", help="run folder, Hub id or shipped model")
    p.add_argument("--volume", type=Path, help="a NIfTI volume (default: a synthetic one)")
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--text", default="FLAIR hyperintense lesion")
    args = p.parse_args()
    device = setup(args)
    rep = Reporter(args)
    t0 = time.perf_counter()
    seg = Segmenter.load(args.model, device=device, batch_size=args.batch)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        volume = args.volume
        if volume is None:
            volume = Path(tmp) / "flair.nii.gz"
            synthetic_volume(volume, args.slices, args.seed)
        n_slices = int(nib.load(str(volume)).shape[2])
        results = []

        def run() -> None:
            opts = PredictOptions(out_dir=Path(tmp) / "out", fmt="nii", overwrite=True)
            results[:] = predict_batch(lambda: seg, inputs=[volume], text=args.text, options=opts)

        timing = time_it(run, device, warmup=args.warmup, repeats=args.repeats)
    r = results[0]
    rep.line(
        f"{args.model}: {n_slices}-slice volume in {timing.median:.2f} s warm (median of "
        f"{args.repeats}; {timing.median / n_slices * 1000:.0f} ms a slice), model load "
        f"{load_s:.2f} s, peak memory {process_peak_rss_mb():.0f} MB; {r.status}, presence "
        f"{r.presence:.2f}"
    )
    rep.emit(
        {
            "bench": "volume",
            "model": args.model,
            "slices": n_slices,
            "seconds_per_volume": timing.to_json(),
            "ms_per_slice": timing.median / n_slices * 1000,
            "load_seconds": load_s,
            "peak_rss_mb": process_peak_rss_mb(),
            "status": r.status,
            "presence": r.presence,
            "machine": machine_info(device),
            "args": args_dict(args),
        }
    )


if __name__ == "__main__":
    main()

"""Samples -> model-ready arrays: image float32 in [0, 1] and mask uint8 {0, 1}, both (S, S).

Images go through the project's readers and ``to_model_input`` (normalised, stretched to a
square). Masks are stretched the same way by AREA resampling then a 0.5 threshold: each output
pixel is foreground when at least half of the source area it covers is foreground. That keeps
the mask's area unbiased when shrinking (nearest-neighbour would drop or keep thin parts by the
luck of the sampling grid) and equals nearest-neighbour when enlarging by an integer factor.

A mask must hold 0 and 1, or 0 and 255 (or be boolean): any other value (a label map, a
background of 3, JPEG ringing) is a dataset problem. The values are checked here, where the
masks are decoded anyway (validation reads only headers); :func:`load_split_arrays` lists
every such mask of the batch, in the format of the validation report.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from mrisegcli.data.layouts import Sample
from mrisegcli.errors import InputError, MrisegError

Progress = Callable[[int, int], None]  # called with (done, total)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) boolean-like mask -> (size, size) uint8 {0, 1} by area average >= 0.5."""
    from PIL import Image

    m = np.ascontiguousarray(mask, dtype=np.float32)
    if m.shape == (size, size):
        return (m > 0).astype(np.uint8)
    frac = np.asarray(Image.fromarray(m).resize((size, size), Image.Resampling.BOX))  # mode "F"
    return (frac >= 0.5).astype(np.uint8)


def load_sample(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one sample: image (size, size) float32 in [0, 1], mask (size, size) uint8 {0, 1}.

    A sample without a mask gets an all-zero mask. 3-D images are refused: the dataset loader
    works on 2-D images (predict handles volumes slice by slice), except for the slices of an
    nnU-Net folder's volumes (``sample.volume``, read by ``volume_slices.py``).
    """
    from mrisegcli.io.intensity import to_model_input
    from mrisegcli.io.read import read_mask, read_scan

    if sample.volume is not None:
        from mrisegcli.data.volume_slices import load_volume_slice

        return _guard(lambda: load_volume_slice(sample, size), sample.image)
    scan = _guard(lambda: read_scan(sample.image), sample.image)
    pixels = scan.pixels
    if pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise InputError(
            f"is a 3-D image ({pixels.shape[0]} slices); datasets need 2-D images "
            "(export the slices as separate files)",
            sample.image,
        )
    image = to_model_input(pixels, size).astype(np.float32, copy=False)  # (S, S)
    if sample.mask is None:
        return image, np.zeros((size, size), dtype=np.uint8)
    mask = _guard(lambda: read_mask(sample.mask, binary=True), sample.mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != pixels.shape:
        raise InputError(
            f"mask is {'x'.join(map(str, mask.shape))} but its image {sample.image.name} is "
            f"{'x'.join(map(str, pixels.shape))}",
            sample.mask,
        )
    return image, resize_mask(mask, size)


def _guard(read: Callable, path: Path | None) -> Any:
    """Run a reader; turn unexpected library errors into one-line errors naming the file."""
    try:
        return read()
    except MrisegError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"cannot read ({type(err).__name__}: {err})", path) from err


def load_split_arrays(
    samples: list[Sample], size: int, workers: int = 0, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load ``samples`` into (N, S, S) float32 images and (N, S, S) uint8 masks.

    ``workers > 0`` reads with that many threads (decoding and resizing release the GIL);
    the result is the same in every case. The first failing sample raises.
    """
    from mrisegcli.io.scan import NonBinaryMaskError

    n = len(samples)
    images_NSS = np.empty((n, size, size), dtype=np.float32)
    masks_NSS = np.empty((n, size, size), dtype=np.uint8)
    non_binary: dict[int, NonBinaryMaskError] = {}

    def one(i: int) -> None:
        try:
            images_NSS[i], masks_NSS[i] = load_sample(samples[i], size)
        except NonBinaryMaskError as err:  # listed together at the end
            non_binary[i] = err

    if workers <= 0:
        for i in range(n):
            one(i)
            if progress is not None:
                progress(i + 1, n)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, i) for i in range(n)]
            try:
                for done, fut in enumerate(as_completed(futures), 1):
                    fut.result()
                    if progress is not None:
                        progress(done, n)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    if non_binary:
        raise _non_binary_report(samples, non_binary)
    return images_NSS, masks_NSS


def _non_binary_report(samples: list[Sample], found: dict[int, Any]) -> MrisegError:
    """Every non-binary mask of the batch as dataset problems, one line each."""
    from mrisegcli.data.validate import NON_BINARY, Problem, format_problems

    problems = [
        Problem(
            samples[i].id,
            samples[i].mask,
            str(found[i]).removeprefix(f"{samples[i].mask}: "),
            NON_BINARY,
        )
        for i in sorted(found)
    ]
    return MrisegError(f"dataset has {len(problems)} problem(s):\n{format_problems(problems)}")

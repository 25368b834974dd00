"""The pixels of volume samples (nnU-Net layout, :class:`~mrisegcli.data.layouts.VolumeSlice`).

A slice of a volume is read as ``predict`` reads the whole volume: the image channel through
:func:`~mrisegcli.io.volume.read_input_scan`, seen through its :class:`~mrisegcli.io.volume.
SliceView` (axial, radiological), normalised over the whole volume at once and each slice
stretched to the model's square; the label map is seen through the same view and the mask is
where it holds the sample's label value(s). So training, evaluation and prediction see the same
slices with the same intensities.

Volumes are read once and kept in a small cache (samples come volume by volume), shared by the
loader's threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mrisegcli.data.layouts import Sample
from mrisegcli.errors import InputError

_CACHED = 8  # volumes kept (images and label maps each)
_lock = threading.Lock()
_images: OrderedDict[tuple, np.ndarray] = OrderedDict()
_labels: OrderedDict[tuple, np.ndarray] = OrderedDict()


def _stamp(path: Path) -> tuple:
    st = Path(path).stat()
    return (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def _cached(store: OrderedDict, key: tuple, make: Callable[[], np.ndarray]) -> np.ndarray:
    with _lock:
        if key in store:
            store.move_to_end(key)
            return store[key]
    value = make()  # outside the lock: other threads read other volumes meanwhile
    with _lock:
        store[key] = value
        while len(store) > _CACHED:
            store.popitem(last=False)
    return value


def clear_cache() -> None:
    with _lock:
        _images.clear()
        _labels.clear()
        _shapes.clear()


def volume_inputs(path: Path, channel: int, size: int) -> np.ndarray:
    """Every slice of a volume as the model sees it: (N, size, size) float32 in [0, 1]."""

    def make() -> np.ndarray:
        from mrisegcli.io.intensity import scan_model_inputs
        from mrisegcli.io.volume import read_input_scan, slice_view, view_scan

        scan = read_input_scan(path, channel)
        return scan_model_inputs(view_scan(scan, slice_view(scan)), size)

    return _cached(_images, ("inputs", *_stamp(path), channel, size), make)


def _raw_labels(path: Path) -> np.ndarray:
    """The stored integer values of a label map, (D, H, W) in the Scan axis order."""
    from mrisegcli.io.read import detect_format

    fmt = detect_format(path)
    if fmt == "nifti":
        import nibabel as nib

        from mrisegcli.io.nifti import nifti_to_dhw

        try:
            img = nib.load(str(path))
            proxy = img.dataobj
            data = np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        except Exception as err:  # noqa: BLE001 - any reader failure: the file cannot be used
            raise InputError(f"cannot read the label map ({err})", path) from err
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim not in (2, 3):
            raise InputError(f"a label map must be 2-D or 3-D, this has shape {data.shape}", path)
        return np.ascontiguousarray(nifti_to_dhw(data))
    if fmt == "raster":
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    from mrisegcli.io.read import read_mask

    return read_mask(path).astype(np.uint8)


def volume_labels(path: Path, allowed: set[int] | None = None) -> np.ndarray:
    """A label map seen through its view: integer (D', H', W'). ``allowed``: refuse other
    values (a label map whose values dataset.json does not name, or a non-integer map)."""

    def make() -> np.ndarray:
        from mrisegcli.io.volume import file_view

        data = _raw_labels(path)
        if data.ndim == 2:
            data = data[None]
        if not np.issubdtype(data.dtype, np.integer):
            if not np.array_equal(data, np.round(data)):
                raise InputError("a label map holds integers; this one holds fractions", path)
            data = data.astype(np.int64)
        if data.shape[0] == 1:
            return data
        return np.ascontiguousarray(file_view(path)[0].to_view(data))

    labels = _cached(_labels, ("labels", *_stamp(path)), make)
    if allowed is not None:
        extra = sorted(set(np.unique(labels).tolist()) - allowed)
        if extra:
            shown = ", ".join(str(v) for v in extra[:6])
            known = ", ".join(str(v) for v in sorted(allowed))
            raise InputError(
                f"label map holds value(s) {shown} that no label names (known: {known}; "
                "dataset.json lists the labels, a folder without it holds 0/1 maps)",
                path,
            )
    return labels


def slice_mask(sample: Sample) -> np.ndarray:
    """The sample's mask at the slice's own resolution (H', W'), bool."""
    part = sample.volume
    assert part is not None and sample.mask is not None
    labels = volume_labels(sample.mask, set(part.known) or None)
    if not 0 <= part.index < len(labels):
        raise InputError(
            f"has {len(labels)} slices, the dataset index expects {part.slices}", sample.mask
        )
    return np.isin(labels[part.index], part.values)


_shapes: dict[tuple, tuple[int, ...]] = {}


def slice_size(sample: Sample) -> tuple[int, int]:
    """(H', W') of the sample's slice as the model sees it (each volume's header read once)."""
    from mrisegcli.io.volume import file_view

    key = _stamp(sample.image)
    if key not in _shapes:
        _shapes[key] = file_view(sample.image)[1]
    shape = _shapes[key]
    return int(shape[1]), int(shape[2])


def load_volume_slice(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (size, size) float32 in [0, 1] and mask (size, size) uint8 of a volume sample."""
    from mrisegcli.data.loading import resize_mask

    part = sample.volume
    assert part is not None
    inputs = volume_inputs(sample.image, part.channel, size)
    if not 0 <= part.index < len(inputs):
        raise InputError(
            f"has {len(inputs)} slices, the dataset index expects {part.slices}", sample.image
        )
    image = inputs[part.index]
    if sample.mask is None:
        return image, np.zeros((size, size), dtype=np.uint8)
    mask = slice_mask(sample)
    return image, resize_mask(mask, size)


__all__ = [
    "clear_cache",
    "load_volume_slice",
    "slice_mask",
    "slice_size",
    "volume_inputs",
    "volume_labels",
]

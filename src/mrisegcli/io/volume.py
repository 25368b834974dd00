"""Volumes: which axis is sliced, and in which in-plane orientation the model sees a slice.

A model segments 2-D slices. Which slices a volume is cut into follows the patient, not the
order of the array's axes: every volume whose orientation is known (a NIfTI file with a qform or
sform code, a DICOM series with positions) is seen through a :class:`SliceView` that cuts it
into **axial** slices shown in the radiological convention, as a radiologist reads them and as
2-D datasets store them: a slice's rows run from anterior (top) to posterior, its columns from
the patient's right (left edge) to the patient's left, and the slices from inferior to
superior. In the terms of :class:`~mrisegcli.io.scan.Scan` (``affine @ [w, h, d, 1]``), the
view's axes ``(w, h, d)`` point to L, P and S: :data:`VIEW_CODES`.

The view is a permutation and flips of the voxel grid, nothing is resampled, so
:meth:`SliceView.from_view` gives back the source grid voxel for voxel: a mask decoded slice by
slice in the view is written with the source's shape and affine (NIfTI) or one frame per source
slice (DICOM SEG). A volume without a known orientation (a raster stack, a NIfTI file without
qform/sform codes) keeps its stored slices (:attr:`SliceView.oriented` is False), and so does a
volume that has a single voxel along another axis than the superior-inferior one (cutting it
axially would give one-row slices).

:func:`read_input_scan` reads what ``mriseg predict`` takes: a 4-D NIfTI file with the
channels last (the Medical Segmentation Decathlon's layout) gives one channel, the first unless
another is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrisegcli.errors import InputError
from mrisegcli.io.scan import Scan

#: where the view's axes (w, h, d) point: columns to the patient's Left, rows Posterior, slices
#: Superior (RAS letters, as nibabel's ``aff2axcodes`` writes them)
VIEW_CODES = ("L", "P", "S")
_PLANES = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal",
           "R": "sagittal"}  # fmt: skip


@dataclass(frozen=True)
class SliceView:
    """How a volume (D, H, W) is turned into the slices a model sees, and back.

    ``forward`` and ``backward`` are nibabel orientation transforms over the reversed axes
    ``(w, h, d)`` (None: the view is the volume as stored). ``source_codes`` are the volume's
    axis codes for ``(w, h, d)`` (None when its orientation is unknown); ``oriented`` says
    whether the view shows axial radiological slices (a volume stored that way has no
    transforms and is oriented all the same).
    """

    forward: np.ndarray | None = None
    backward: np.ndarray | None = None
    source_codes: tuple[str, str, str] | None = None
    oriented: bool = False

    @property
    def moves(self) -> bool:
        """Whether the view differs from the stored array (axes permuted or flipped)."""
        return self.forward is not None

    @property
    def source_plane(self) -> str | None:
        """The plane of the volume's stored slices ("axial", "coronal", "sagittal"), if known."""
        return None if self.source_codes is None else _PLANES.get(self.source_codes[2])

    def to_view(self, volume_DHW: np.ndarray) -> np.ndarray:
        """A scan-shaped (D, H, W) array -> the view's (D', H', W') (a view, not a copy)."""
        if self.forward is None:
            return volume_DHW
        from nibabel.orientations import apply_orientation

        return apply_orientation(np.asarray(volume_DHW).T, self.forward).T

    def from_view(self, view_DHW: np.ndarray) -> np.ndarray:
        """Exact inverse of :meth:`to_view`: a view-shaped array back on the source grid."""
        if self.backward is None:
            return view_DHW
        from nibabel.orientations import apply_orientation

        return apply_orientation(np.asarray(view_DHW).T, self.backward).T

    def spacing(self, spacing_DHW: tuple[float, ...]) -> tuple[float, ...]:
        """The voxel size (mm) along the view's axes (D', H', W')."""
        if self.forward is None:
            return tuple(spacing_DHW)
        whd = list(reversed(spacing_DHW))
        out = [0.0, 0.0, 0.0]
        for axis, (target, _flip) in enumerate(self.forward):
            out[int(target)] = whd[axis]
        return tuple(reversed(out))


IDENTITY = SliceView()


def has_orientation(scan: Scan) -> bool:
    """Whether the scan's affine says where the patient is (not just a voxel size)."""
    if scan.affine is None:
        return False
    if scan.format == "nifti":
        hdr = scan.nifti_header
        if hdr is None:
            return False
        return int(hdr["sform_code"]) > 0 or int(hdr["qform_code"]) > 0
    return scan.format == "dicom"


def slice_view(scan: Scan) -> SliceView:
    """The :class:`SliceView` of a scan: axial radiological slices when its orientation is known
    and the volume can be cut so; the stored slices otherwise (and always for 2-D images)."""
    if not scan.is_volume or not has_orientation(scan):
        return IDENTITY
    import nibabel as nib

    return _view_of(nib.aff2axcodes(scan.ras_affine()), scan.shape)


def _view_of(codes: tuple, shape_DHW: tuple[int, ...]) -> SliceView:
    """The view of a volume (D, H, W) whose axes (w, h, d) point to ``codes``."""
    from nibabel.orientations import axcodes2ornt, ornt_transform

    if any(c is None for c in codes):
        return IDENTITY
    codes = tuple(str(c) for c in codes)
    start, target = axcodes2ornt(codes), axcodes2ornt(VIEW_CODES)
    forward = ornt_transform(start, target)
    # the axis that becomes the slice axis is the superior-inferior one; the others must have
    # more than one voxel, or the axial slices would be single rows or columns
    whd_shape = tuple(reversed(shape_DHW))
    if any(whd_shape[a] == 1 for a in range(3) if int(forward[a][0]) != 2):
        return SliceView(source_codes=codes)
    if np.array_equal(forward, [[0, 1], [1, 1], [2, 1]]):  # already in the view
        return SliceView(source_codes=codes, oriented=True)
    return SliceView(forward, ornt_transform(target, start), codes, oriented=True)


def file_view(path: str | Path) -> tuple[SliceView, tuple[int, ...]]:
    """The view of an image file and the view's shape (D', H', W'), from the header alone for
    NIfTI (the first three axes of a 4-D file); other files are read. A 2-D image is a view of
    one slice, (1, H, W)."""
    from mrisegcli.io.read import detect_format, read_scan

    path = Path(path)
    if detect_format(path) == "nifti":
        import nibabel as nib

        try:
            img = nib.load(str(path))
            shape = tuple(int(n) for n in img.shape)
        except Exception as err:  # noqa: BLE001 - any reader failure: the file cannot be used
            raise InputError(f"not a readable NIfTI file ({err})", path) from err
        if len(shape) == 2 or (len(shape) >= 3 and shape[2] == 1 and len(shape) == 3):
            return IDENTITY, (1, shape[1], shape[0])
        dhw = (shape[2], shape[1], shape[0])
        hdr = img.header
        if int(hdr["sform_code"]) <= 0 and int(hdr["qform_code"]) <= 0:
            return IDENTITY, dhw
        view = _view_of(nib.aff2axcodes(img.affine), dhw)
        return view, tuple(view.to_view(np.empty(dhw, dtype=np.uint8)).shape)
    scan = read_scan(path)
    if not scan.is_volume:
        return IDENTITY, (1, *scan.shape)
    view = slice_view(scan)
    return view, tuple(view.to_view(scan.pixels).shape)


def view_scan(scan: Scan, view: SliceView) -> Scan:
    """The scan as its view shows it (pixels and spacing; intensity meta kept, no geometry or
    source datasets): what the model's inputs are made from."""
    if not view.moves:
        return scan
    pixels = np.ascontiguousarray(view.to_view(scan.pixels))
    meta = {k: v for k, v in scan.meta.items() if k == "window"}
    return Scan(pixels, scan.path, scan.format, view.spacing(scan.spacing), meta=meta)


def nifti_channels(path: Path) -> int:
    """Channels along the 4th axis of a NIfTI file (1 for 2-D and 3-D files), from its header."""
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception:  # noqa: BLE001 - unreadable: the reader says why when it reads the file
        return 1
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return int(np.prod(shape[3:])) if len(shape) > 3 else 1


def read_input_scan(path: str | Path, channel: int = 0) -> Scan:
    """Read an input of ``predict``: any :func:`~mrisegcli.io.read.read_scan` input, and a 4-D
    NIfTI file with the channels last (channel ``channel``; ``meta["channels"]`` holds their
    number)."""
    from mrisegcli.io.read import detect_format, read_scan

    path = Path(path)
    if detect_format(path) != "nifti":
        return read_scan(path)
    n = nifti_channels(path)
    if n <= 1:
        return read_scan(path)
    if not 0 <= channel < n:
        raise InputError(f"has {n} channels (0..{n - 1}); channel {channel} does not exist", path)
    scan = read_scan(path, frame=channel)
    scan.meta["channel"], scan.meta["channels"] = channel, n
    return scan


def voxel_ml(spacing: tuple[float, ...]) -> float:
    """The volume of one voxel in millilitres (spacing in mm)."""
    return float(np.prod([float(s) for s in spacing])) / 1000.0


def volume_facts(scan: Scan, view: SliceView, mask_DHW: np.ndarray) -> dict:
    """What ``predict --json`` says of a volume's mask (plain JSON types).

    ``sliced``: "axial" when the volume was cut along the patient's axes, else "as stored";
    ``slices`` and ``slices_with_foreground`` count the slices the model saw; ``foreground_ml``
    is the mask's volume in millilitres (None when the voxel size is unknown: a raster stack);
    ``channel`` / ``channels`` for a 4-D input.
    """
    mask_view = np.asarray(view.to_view(mask_DHW))
    per_slice = mask_view.reshape(mask_view.shape[0], -1).any(axis=1)
    facts: dict = {
        "sliced": "axial" if view.oriented else "as stored",
        "stored_plane": view.source_plane,
        "slices": int(mask_view.shape[0]),
        "slices_with_foreground": int(per_slice.sum()),
        "foreground_voxels": int(np.count_nonzero(mask_DHW)),
        "foreground_ml": None,
        "spacing_mm": [round(float(s), 6) for s in view.spacing(scan.spacing)],
    }
    if scan.format in ("nifti", "dicom"):
        facts["foreground_ml"] = round(facts["foreground_voxels"] * voxel_ml(scan.spacing), 6)
    if "channels" in scan.meta:
        facts["channel"], facts["channels"] = scan.meta["channel"], scan.meta["channels"]
    return facts


def mask_geometry(path: str | Path) -> tuple[tuple[float, ...] | None, np.ndarray | None]:
    """(voxel size in mm along the (D, H, W) axes of :func:`~mrisegcli.io.read.read_mask`, the
    affine) of a NIfTI mask, from its header; (None, None) for other files (size unknown)."""
    from mrisegcli.io.read import is_nifti_name

    if not is_nifti_name(path):
        return None, None
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:  # noqa: BLE001 - the mask reader reports an unreadable file
        return None, None
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        return None, None
    return tuple(reversed(zooms)), np.asarray(img.affine, dtype=np.float64)


def check_same_grid(pred: Path, gt: Path) -> tuple[float, ...] | None:
    """The ground truth's voxel size (mm, (D, H, W)) after checking that a NIfTI prediction lies
    on the same voxel grid (affine) as its NIfTI ground truth: scores of masks that do not
    overlay each other would mean nothing."""
    spacing, gt_affine = mask_geometry(gt)
    _, pred_affine = mask_geometry(pred)
    if gt_affine is not None and pred_affine is not None:
        if not np.allclose(pred_affine, gt_affine, rtol=1e-4, atol=1e-3):
            import nibabel as nib

            raise InputError(
                "lies on another voxel grid than its ground truth "
                f"{Path(gt).name} (affines differ: {''.join(nib.aff2axcodes(pred_affine))} "
                f"{np.round(np.diag(pred_affine)[:3], 3).tolist()} against "
                f"{''.join(nib.aff2axcodes(gt_affine))} "
                f"{np.round(np.diag(gt_affine)[:3], 3).tolist()})",
                pred,
            )
    return spacing


__all__ = [
    "IDENTITY",
    "VIEW_CODES",
    "SliceView",
    "check_same_grid",
    "file_view",
    "has_orientation",
    "mask_geometry",
    "nifti_channels",
    "read_input_scan",
    "slice_view",
    "view_scan",
    "volume_facts",
    "voxel_ml",
]

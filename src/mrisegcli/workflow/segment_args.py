"""The arguments of :meth:`~mrisegcli.workflow.segmenter.Segmenter.segment`, checked.

``images`` is one image or a list (or tuple) of them; an image is a path (``str`` or any
``os.PathLike``) or a 2-D array (numpy, or anything ``numpy.asarray`` takes: a CPU tensor, a
grey PIL image) of numbers or booleans. ``texts`` is one prompt for every image or a list of
one per image. Anything else is a ``TypeError`` (a wrong kind of value) or a ``ValueError``
(an empty list, an array that is not 2-D or is empty, counts that differ) saying what is
expected; a prompt that is empty, has no letters or digits or is not valid UTF-8 is a
:class:`~mrisegcli.errors.MrisegError` as on the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

EXPECTED = "a path, a 2-D array, or a list of them"


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or hasattr(value, "__array__")


def _image_list(images: Any) -> list[Any]:
    if _is_path(images):
        return [images]
    if _is_array(images):
        arr = np.asarray(images)
        if arr.ndim == 2:
            return [images]
        raise ValueError(
            f"images is an array of shape {arr.shape}: give one 2-D image (H, W), or a list of "
            "them (list(stack) for a stack of slices)"
        )
    if isinstance(images, (list, tuple)):
        return list(images)
    raise TypeError(f"images must be {EXPECTED}, not {type(images).__name__}")


def _image(value: Any, i: int) -> Path | np.ndarray:
    if _is_path(value):
        return Path(value)
    if not _is_array(value):
        raise TypeError(f"images[{i}] is {type(value).__name__}: expected a path or a 2-D array")
    arr = np.asarray(value)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise TypeError(f"images[{i}] is an array of {arr.dtype}: expected numbers or booleans")
    if arr.ndim != 2:
        raise ValueError(
            f"images[{i}] has shape {arr.shape}: expected a 2-D image (H, W) (convert a colour "
            "image to grey; segment a volume with mriseg predict)"
        )
    if arr.size == 0:
        raise ValueError(f"images[{i}] is empty (shape {arr.shape})")
    return arr


def _text_list(texts: Any, n: int) -> list[str]:
    from mrisegcli.io.prompts import validate_text

    if isinstance(texts, str):
        return [validate_text(texts, "texts")] * n
    if not isinstance(texts, (list, tuple)):
        raise TypeError(
            f"texts must be a string or a list of strings (one per image), not "
            f"{type(texts).__name__}"
        )
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}: expected a string")
        out.append(validate_text(text, f"texts[{i}]"))
    return out


def images_and_texts(images: Any, texts: Any) -> tuple[list[Path | np.ndarray], list[str]]:
    """``(images, texts)``: one path or 2-D array per image and one checked prompt per image."""
    items = _image_list(images)
    if not items:
        raise ValueError(f"no images: give {EXPECTED}")
    checked = [_image(v, i) for i, v in enumerate(items)]
    prompts = _text_list(texts, len(checked))
    if len(prompts) != len(checked):
        raise ValueError(f"{len(checked)} images but {len(prompts)} texts")
    return checked, prompts


__all__ = ["images_and_texts"]

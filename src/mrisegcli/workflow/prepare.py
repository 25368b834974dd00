"""Raw dataset -> fitted tokenizers -> code cache: the stages before any transformer training.

``mriseg tokenize`` runs these stages alone; ``mriseg train`` runs them first (reusing whatever
already exists). Each stage reports through a progress callable and skips work already done:
tokenizers found in the bundle folder are loaded, cache entries whose source files and text are
unchanged are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrisegcli.config import RunConfig
from mrisegcli.data.layouts import Dataset, Sample, load_dataset
from mrisegcli.errors import MrisegError
from mrisegcli.workflow.bundle import TokenizerBundle, has_bundle, load_bundle, needed_tokenizers

#: a factory of progress callables: ``stage("fitting mask tokenizer", total)`` -> progress(done, total, metrics)
StageFactory = Callable[[str, int | None], Any]
SPLITS = ("train", "val", "test")


def no_stage(description: str, total: int | None) -> Any:
    """The :data:`StageFactory` that shows nothing (every ``stage`` argument's default): a
    context manager that gives ``None`` instead of a progress callable."""
    import contextlib

    return contextlib.nullcontext(None)


def open_dataset(
    root: Path | list[Path],
    layout: str | None,
    *,
    seed: int = 0,
    check: bool = True,
    texts: Path | None = None,
) -> Dataset:
    """Load a dataset index (or several, merged) and refuse it, listing every problem, when it
    is not usable. ``texts``: the texts file of nnU-Net volume folders (``--texts``)."""
    from mrisegcli.data.layouts import dataset_name, merge_datasets
    from mrisegcli.data.validate import format_problems, validate_dataset

    roots = [Path(r) for r in root] if isinstance(root, (list, tuple)) else [Path(root)]
    if not roots:
        raise MrisegError("no dataset given")
    ds = merge_datasets(
        [load_dataset(r, layout, seed=seed, texts=texts) for r in roots],
        [dataset_name(r) for r in roots],
    )
    where = roots[0] if len(roots) == 1 else ds.root
    if not ds.split("train") and not ds.split("test"):
        raise MrisegError("dataset has no train or test samples", where)
    if check:
        problems = validate_dataset(ds, check_images=True)
        if problems:
            raise MrisegError(
                f"dataset has {len(problems)} problem(s):\n{format_problems(problems)}", where
            )
    return ds


def load_arrays(
    samples: list[Sample], size: int, workers: int, stage: StageFactory
) -> tuple[np.ndarray, np.ndarray]:
    from mrisegcli.data.loading import load_split_arrays

    with stage(f"reading {len(samples)} images", len(samples)) as progress:
        return load_split_arrays(samples, size, workers=workers, progress=progress)


# ---------------------------------------------------------------------------------- tokenizers
def fit_bundle(
    cfg: RunConfig,
    train_samples: list[Sample],
    images_NSS: np.ndarray,
    masks_NSS: np.ndarray,
    *,
    device: torch.device,
    stage: StageFactory = no_stage,
    max_seconds: float | None = None,
) -> tuple[TokenizerBundle, dict[str, dict]]:
    """Fit every tokenizer the paradigm needs on the training split; returns their reports.

    ``max_seconds``: a wall-clock budget for all of them, shared in proportion to their steps.
    """
    from mrisegcli.tokenizers.fit import fit_image_vq, fit_mask_vq, fit_multiscale
    from mrisegcli.tokenizers.text import train_text_tokenizer

    need = needed_tokenizers(cfg.paradigm, cfg.strategies.image_input)
    f = cfg.fit
    common = {"batch_size": f.batch_size, "lr": f.lr, "seed": cfg.seed, "device": str(device)}
    parts: dict[str, Any] = {}
    reports: dict[str, dict] = {}
    plan = [
        ("mask_vq", "fitting mask tokenizer", fit_mask_vq, masks_NSS, cfg.mask_vq, f.mask_steps),
        (
            "image_vq",
            "fitting image tokenizer",
            fit_image_vq,
            images_NSS,
            cfg.image_vq,
            f.image_steps,
        ),
        (
            "multiscale",
            "fitting multi-scale mask tokenizer",
            fit_multiscale,
            masks_NSS,
            cfg.multiscale,
            f.multiscale_steps,
        ),
    ]
    plan = [row for row in plan if row[0] in need]
    all_steps = sum(row[5] for row in plan)
    for name, title, fit, data, tcfg, steps in plan:
        limit = None if max_seconds is None else max_seconds * steps / max(1, all_steps)
        with stage(title, steps) as progress:
            tok, report = fit(
                data, tcfg, steps=steps, progress=progress, max_seconds=limit, **common
            )
        parts[name] = tok.eval()
        reports[name] = report
    text = train_text_tokenizer([s.text for s in train_samples], vocab_size=f.text_vocab_size)
    return TokenizerBundle(text=text, **parts), reports


def obtain_bundle(
    cfg: RunConfig,
    ds: Dataset,
    *,
    tokenizer_dir: Path | None,
    save_dir: Path,
    device: torch.device,
    workers: int = 0,
    stage: StageFactory = no_stage,
    max_seconds: float | None = None,
) -> tuple[TokenizerBundle, dict[str, dict], tuple[np.ndarray, np.ndarray] | None]:
    """Load the tokenizers from ``tokenizer_dir`` (or ``save_dir`` when it has them), else fit
    them on the train split and save them into ``save_dir``. Also returns the train arrays when
    they had to be read (so caching need not read them again)."""
    from mrisegcli.workflow.bundle import copy_bundle, save_bundle

    need = needed_tokenizers(cfg.paradigm, cfg.strategies.image_input)
    source = (
        tokenizer_dir if tokenizer_dir is not None else (save_dir if has_bundle(save_dir) else None)
    )
    if source is not None:
        bundle = load_bundle(source, need=need)
        if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != Path(save_dir).resolve():
            save_dir.mkdir(parents=True, exist_ok=True)
            copy_bundle(Path(tokenizer_dir), save_dir)
        return bundle.to(device), {}, None
    train = ds.split("train")
    if not train:
        raise MrisegError(
            "no training samples to fit the tokenizers on (give --tokenizer)", ds.root
        )
    arrays = load_arrays(train, cfg.image_size, workers, stage)
    bundle, reports = fit_bundle(
        cfg, train, *arrays, device=device, stage=stage, max_seconds=max_seconds
    )
    save_bundle(bundle, save_dir, overwrite=True)
    return bundle.to(device), reports, arrays


# ---------------------------------------------------------------------------------- code cache
def cache_fields(bundle: TokenizerBundle) -> list[str]:
    fields = ["image", "mask", "text_ids", "text_mask"]
    if bundle.mask_vq is not None:
        fields.append("mask_codes")
    if bundle.image_vq is not None:
        fields.append("image_codes")
    if bundle.multiscale is not None:
        fields.append("ms_codes")
    return fields


@torch.no_grad()
def encode_batch(
    bundle: TokenizerBundle,
    images_NSS: np.ndarray,
    masks_NSS: np.ndarray,
    texts: list[str],
    text_len: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Everything a model needs of a batch of samples, as compact CPU tensors."""
    from mrisegcli.tokenizers.text import encode_texts

    img_B1SS = torch.from_numpy(images_NSS).float()[:, None].to(device)
    msk_B1SS = torch.from_numpy(masks_NSS).float()[:, None].to(device)
    ids_BL, tmask_BL = encode_texts(bundle.text, texts, text_len)
    out = {
        "image": torch.from_numpy(np.round(images_NSS * 255).astype(np.uint8)),
        "mask": torch.from_numpy(masks_NSS.astype(np.uint8)),
        "text_ids": ids_BL.to(torch.int32),
        "text_mask": tmask_BL.to(torch.uint8),
    }
    for key, codes in tokenize_tensors(bundle, img_B1SS, msk_B1SS).items():
        out[key] = codes.to(torch.int16).cpu()
    return out


@torch.no_grad()
def tokenize_tensors(
    bundle: TokenizerBundle, img_B1SS: torch.Tensor, msk_B1SS: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The int64 codes of every tokenizer of ``bundle`` for images and masks (B, 1, S, S)
    float: ``mask_codes`` (B, g, g), ``image_codes`` (B, g, g), ``ms_codes`` (B, L) with the
    scales flattened coarse to fine."""
    out: dict[str, torch.Tensor] = {}
    if bundle.mask_vq is not None:
        out["mask_codes"] = bundle.mask_vq.encode(msk_B1SS)
    if bundle.image_vq is not None:
        out["image_codes"] = bundle.image_vq.encode(img_B1SS)
    if bundle.multiscale is not None:
        idx_list = bundle.multiscale.encode(msk_B1SS)
        out["ms_codes"] = torch.cat([i.flatten(1) for i in idx_list], 1)
    return out


@dataclass
class CacheReport:
    encoded: int
    reused: int
    seconds: float


def build_cache(
    cache_dir: Path,
    ds: Dataset,
    bundle: TokenizerBundle,
    cfg: RunConfig,
    *,
    device: torch.device,
    workers: int = 0,
    overwrite: bool = False,
    stage: StageFactory = no_stage,
    batch_size: int = 64,
) -> CacheReport:
    """Encode every sample not already in the cache (incremental; resumable after a crash)."""
    import time

    from mrisegcli.data.loading import load_split_arrays
    from mrisegcli.tokenizers.cache import open_cache, sample_fingerprint

    t0 = time.perf_counter()
    fp = f"{bundle.fingerprint()}-size{cfg.image_size}-text{cfg.text_len}"
    samples = [s for split in SPLITS for s in ds.split(split)]
    with open_cache(cache_dir, fp, cache_fields(bundle), overwrite=overwrite) as cache:
        todo: list[tuple[Sample, str]] = []
        for s in samples:
            sfp = sample_fingerprint(s.image, s.mask, s.text, s.volume)
            if cache.needs(s.id, sfp):
                todo.append((s, sfp))
        with stage(f"encoding {len(todo)} samples", len(todo)) as progress:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                images, masks = load_split_arrays(
                    [s for s, _ in chunk], cfg.image_size, workers=workers
                )
                tensors = encode_batch(
                    bundle, images, masks, [s.text for s, _ in chunk], cfg.text_len, device
                )
                for i, (s, sfp) in enumerate(chunk):
                    size = _original_size(s)
                    cache.add(
                        s.id,
                        {
                            "split": s.split,
                            "source_fp": sfp,
                            "image": str(s.image),
                            "mask": str(s.mask or ""),
                            "text": s.text,
                            "size": size,
                        },
                        {k: v[i] for k, v in tensors.items()},
                    )
                if progress is not None:
                    progress(min(start + batch_size, len(todo)), len(todo))
    return CacheReport(
        encoded=len(todo), reused=len(samples) - len(todo), seconds=time.perf_counter() - t0
    )


def _original_size(s: Sample) -> tuple[int, int]:
    from PIL import Image

    if s.volume is not None:  # a slice of a volume, as the model sees it
        from mrisegcli.data.volume_slices import slice_size

        return slice_size(s)
    try:
        with Image.open(s.image) as im:
            return (im.height, im.width)
    except Exception:  # DICOM / NIfTI: read the header through our reader
        from mrisegcli.io.read import read_scan

        shape = read_scan(s.image).pixels.shape
        return (int(shape[-2]), int(shape[-1]))


def load_cached_split(cache_dir: Path, bundle: TokenizerBundle, cfg: RunConfig, split: str):
    """The stacked tensors of one split (``LoadedCodes``) from a built cache."""
    from mrisegcli.tokenizers.cache import open_cache

    fp = f"{bundle.fingerprint()}-size{cfg.image_size}-text{cfg.text_len}"
    cache = open_cache(cache_dir, fp, cache_fields(bundle), create=False)
    return cache.load(split)


def removed_on_error(folder: Path) -> Any:
    """A context in which a failure (a dataset refused while its codes are cached, Ctrl-C)
    removes what the block added to ``folder``: tokenizer files that were not there before, a
    code cache it made, and ``folder`` itself when it made it and left it empty. What was there
    before is left as it is."""
    import contextlib

    from mrisegcli import runfolder
    from mrisegcli.runinfo import RUN_FOLDERS

    folder = Path(folder)
    names = [
        *runfolder.TOKENIZERS.values(),
        *runfolder.TEXT_TOKENIZER_FILES,
        runfolder.SPECIAL_TOKENS_MAP,
    ]
    existed = folder.exists()
    before = {n for n in names if (folder / n).exists() or (folder / n).is_symlink()}
    cache = folder / runfolder.CACHE
    cache_existed = cache.exists() or cache.is_symlink()

    def undo() -> None:
        for name in names:
            path = folder / name
            if name not in before and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
        if not cache_existed and cache.is_dir() and not cache.is_symlink():
            for f in cache.iterdir():
                if f.is_file() and RUN_FOLDERS[runfolder.CACHE].match(f.name):
                    f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                cache.rmdir()
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()

    @contextlib.contextmanager
    def guard() -> Any:
        try:
            yield
        except BaseException:
            undo()
            raise

    return guard()

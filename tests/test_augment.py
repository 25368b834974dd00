"""Training-time augmentation: image and mask move together, the codes are those of the
transformed mask, draws are reproducible per step, and `mriseg train --augment` trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.tokenizers.mask_vq import MaskVQ, MaskVQConfig
from mrisegcli.tokenizers.multiscale import MultiScaleConfig, MultiScaleMaskQuantizer
from mrisegcli.training.augment import Augmenter, AugmentRanges, augment_pair
from mrisegcli.workflow.bundle import TokenizerBundle
from mrisegcli.workflow.prepare import encode_batch

GEOMETRY_ONLY = AugmentRanges(gamma=1.0, contrast=0.0, brightness=0.0)


def _blobs(B: int = 8, S: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-centre squares of different sizes; the image is the mask, brightened."""
    mask = torch.zeros(B, S, S, dtype=torch.uint8)
    for b in range(B):
        y, x, h = 6 + 3 * b, 10 + 2 * b, 12 + b
        mask[b, y : y + h, x : x + h + 6] = 1
    return 0.1 + 0.8 * mask[:, None].float(), mask


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum() / (a | b).sum().clamp(min=1))


def test_image_and_mask_are_transformed_together(one_thread) -> None:
    image, mask = _blobs()
    out_img, out_mask = augment_pair(
        image, mask, 1.0, torch.Generator().manual_seed(0), GEOMETRY_ONLY
    )
    assert out_mask.dtype == torch.uint8 and set(out_mask.unique().tolist()) <= {0, 1}
    assert out_img.shape == image.shape and float(out_img.min()) >= 0 and float(out_img.max()) <= 1
    moved = [_iou(out_mask[b], mask[b]) for b in range(len(mask))]
    assert min(moved) < 0.9  # the masks did move
    for b in range(len(mask)):  # and the image moved with them
        assert _iou(out_img[b, 0] > 0.5, out_mask[b]) > 0.9


def test_draws_are_reproducible_and_p_zero_changes_nothing(one_thread) -> None:
    image, mask = _blobs()

    def run(seed: int, p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_pair(image, mask, p, torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    same = run(3, p=0.0)
    assert same[0] is image and same[1] is mask
    # intensity: with no geometry the blob keeps its place and only its grey levels change
    intensity_only = AugmentRanges(degrees=0.0, scale=0.0, shift=0.0)
    img, msk = augment_pair(image, mask, 1.0, torch.Generator().manual_seed(0), intensity_only)
    assert torch.equal(msk, mask)
    assert not torch.allclose(img, image)


@pytest.fixture(scope="module")
def bundle() -> TokenizerBundle:
    torch.manual_seed(0)
    return TokenizerBundle(
        text=None,
        mask_vq=MaskVQ(MaskVQConfig(image_size=64, downsample=8, channels=(8, 16, 16))).eval(),
        multiscale=MultiScaleMaskQuantizer(
            MultiScaleConfig(image_size=64, downsample=8, channels=(8, 16, 16), scales=(1, 2, 4, 8))
        ).eval(),
    )


def test_augmenter_replaces_the_codes_by_those_of_the_transformed_mask(one_thread, bundle) -> None:
    image, mask = _blobs()
    from mrisegcli.tokenizers.text import train_text_tokenizer

    text = train_text_tokenizer(["a polyp", "the left lung"], vocab_size=60)
    cached = encode_batch(
        TokenizerBundle(text=text, mask_vq=bundle.mask_vq, multiscale=bundle.multiscale),
        image[:, 0].numpy(),
        mask.numpy(),
        ["a polyp"] * len(mask),
        8,
        torch.device("cpu"),
    )
    batch = {
        "image": image,
        "mask": mask,
        # stale codes: every one of them must be replaced
        "mask_codes": torch.randint(0, 7, cached["mask_codes"].shape) + 1000,
        "ms_codes": torch.randint(0, 7, cached["ms_codes"].shape) + 1000,
        "text_ids": cached["text_ids"].long(),
    }
    out = Augmenter(bundle, 1.0, seed=0)(batch, step=5)
    assert torch.equal(out["text_ids"], batch["text_ids"])
    assert out["mask_codes"].dtype == torch.int64 and "image_codes" not in out
    expected = bundle.mask_vq.encode(out["mask"][:, None].float())
    assert torch.equal(out["mask_codes"], expected)
    scales = bundle.multiscale.encode(out["mask"][:, None].float())
    assert torch.equal(out["ms_codes"], torch.cat([s.flatten(1) for s in scales], 1))
    # the same step draws the same transform (a resumed run repeats it), another step another
    again = Augmenter(bundle, 1.0, seed=0)(batch, step=5)
    assert torch.equal(again["mask"], out["mask"])
    assert not torch.equal(Augmenter(bundle, 1.0, seed=0)(batch, step=6)["mask"], out["mask"])
    # another DDP rank draws its own transforms for the same step
    assert not torch.equal(
        Augmenter(bundle, 1.0, seed=0, rank=1)(batch, step=5)["mask"], out["mask"]
    )
    with pytest.raises(ValueError, match="augmentation probability"):
        Augmenter(bundle, 0.0, seed=0)


@pytest.mark.parametrize("paradigm", ["next-token", "next-scale"])
def test_train_with_augment(tmp_path: Path, paradigm: str, monkeypatch) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    r = runner.invoke(
        app,
        ["synth", str(data), "--n-train", "16", "--n-val", "4", "--n-test", "2", "--size", "32"],
    )
    assert r.exit_code == 0, r.output
    seen: list[int] = []
    original = Augmenter.__call__

    def spy(self, batch, step):
        seen.append(step)
        return original(self, batch, step)

    monkeypatch.setattr(Augmenter, "__call__", spy)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--paradigm", paradigm]
    args += ["--preset", "tiny", "--size", "32", "--steps", "6", "--batch-size", "4"]
    args += ["--mask-steps", "20", "--image-steps", "20", "--multiscale-steps", "20"]
    args += ["--eval-every", "6", "--augment", "0.5", "--device", "cpu", "--workers", "0"]
    r = runner.invoke(app, [*args, "--quiet"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert seen == list(range(6))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["strategies"]["augment"] == 0.5
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["best_val_dice"])

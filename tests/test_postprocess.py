"""Small 3-D components dropped from a volume's mask (postprocess.py): the rule itself, its
choice on labelled volumes (``calibrate --volumes``), and ``predict`` / ``evaluate`` applying
the share a model records (or the one given), with a rule-based fake model."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from test_predict_workflow import FakeSegmenter, run_predict

from mrisegcli.errors import ConfigError, MrisegError
from mrisegcli.postprocess import (
    CANDIDATE_SHARES,
    choose_min_share,
    component_table,
    drop_small_components,
    min_component_share,
)
from mrisegcli.workflow.evaluate_model import evaluate_model
from mrisegcli.workflow.volume_eval import fit_component_rule

AFFINE = np.diag([-1.0, 1.0, 2.5, 1.0])


def test_drop_small_components_keeps_what_is_large_enough():
    m = np.zeros((6, 12, 12), bool)
    m[1:5, 1:6, 1:6] = True  # 100 voxels
    m[1:3, 8:11, 8:11] = True  # 18 voxels
    m[5, 11, 11] = True  # 1 voxel, alone
    m[5, 6, 6] = True  # touches the large block at a corner only: 26-connected, kept with it
    assert drop_small_components(m, 0.0) is not None
    np.testing.assert_array_equal(drop_small_components(m, 0.0), m)
    kept = drop_small_components(m, 0.1)
    assert kept[1:3, 8:11, 8:11].all() and not kept[5, 11, 11] and kept[5, 6, 6]
    largest = drop_small_components(m, 1.0)
    assert largest.sum() == 101 and not largest[1, 8, 8]
    assert not drop_small_components(np.zeros((3, 4, 4), bool), 0.5).any()
    flat = np.zeros((8, 8), bool)
    flat[0:4, 0:4] = flat[7, 7] = True
    assert drop_small_components(flat, 0.5).sum() == 16  # 2-D: 8-connected components
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_small_components(m, 1.5)


def test_the_choice_needs_a_gain_and_takes_the_smallest_best_share():
    gt = np.zeros((4, 16, 16), bool)
    gt[1:3, 2:10, 2:10] = True
    island = gt.copy()
    island[0, 14:16, 14:16] = True  # a false positive far away
    table = component_table([(island, gt, (2.5, 1.0, 1.0))])
    assert [r["min_component_share"] for r in table] == list(CANDIDATE_SHARES)
    assert table[0]["dice"] < 1.0 == table[1]["dice"]
    assert table[1]["hd95_mm"] == 0.0 <= table[0]["hd95_mm"]
    assert choose_min_share(table) == 0.05
    two_lesions = gt.copy()
    two_lesions[0, 14:16, 14:16] = True
    # every component is true: no share beats keeping them all, so nothing is dropped
    assert choose_min_share(component_table([(two_lesions, two_lesions, None)])) == 0.0


def test_a_recorded_share_is_read_and_checked():
    assert min_component_share(None) == 0.0
    assert min_component_share({"min_component_share": 0.2}) == 0.2
    for bad in ({"min_component_share": 2}, {"min_component_share": "x"}, {}, []):
        with pytest.raises(ConfigError, match="min_component_share"):
            min_component_share(bad, "run/config.json")


def _lesion_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) (I, J, K): a lesion block and, in the image only, a bright island."""
    rng = np.random.default_rng(seed)
    label = np.zeros((24, 24, 8), np.uint8)
    label[4:14, 4:14, 2:6] = 1
    image = rng.normal(20, 2, label.shape).astype(np.float32)
    image[label == 1] = 250
    image[18:22, 18:22, 7] = 250  # the fake model draws it: a false positive (4% of the lesion)
    return image, label


def _save(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def _volume_folder(root, cases=2):
    for i in range(cases):
        image, label = _lesion_volume(i)
        _save(root / "imagesTs" / f"c{i}_0000.nii.gz", image)
        _save(root / "labelsTs" / f"c{i}.nii.gz", label)
    (root / "texts.csv").write_text("label,text\nforeground,bright lesion\n")
    return root


def test_predict_drops_the_islands_of_a_volume_only(tmp_path):
    image, label = _lesion_volume()
    _save(tmp_path / "in" / "v.nii.gz", image)
    seg = FakeSegmenter(32, with_extras=False)
    seg.min_component_share = 0.1  # as recorded in a run's config.json
    (r,) = run_predict(seg, [tmp_path / "in" / "v.nii.gz"], "lesion", out_dir=tmp_path / "a")
    mask = np.asarray(nib.load(r.outputs["mask"]).dataobj) > 0
    assert mask[4:14, 4:14, 2:6].mean() > 0.9 and not mask[18:22, 18:22, 7].any()
    assert r.volume["min_component_share"] == 0.1
    (r,) = run_predict(seg, [tmp_path / "in" / "v.nii.gz"], "lesion", out_dir=tmp_path / "b",
                       min_component_share=0.0)  # fmt: skip
    mask = np.asarray(nib.load(r.outputs["mask"]).dataobj) > 0
    assert mask[18:22, 18:22, 7].all() and r.volume["min_component_share"] == 0.0


def test_the_share_is_chosen_on_volumes_and_evaluate_applies_it(tmp_path):
    root = _volume_folder(tmp_path / "vols")
    seg = FakeSegmenter(32, with_extras=False)
    rule = fit_component_rule(seg, root)
    assert rule["min_component_share"] == 0.05 and rule["volumes"] == [
        "c0/foreground",
        "c1/foreground",
    ]
    rows = {r["min_component_share"]: r for r in rule["candidates"]}
    assert rows[0.05]["dice"] > rows[0.0]["dice"] and rows[0.05]["hd95_mm"] < rows[0.0]["hd95_mm"]
    json.dumps(rule)  # plain JSON types: it goes into config.json

    before = evaluate_model(seg, root, split="test", ceiling=False).summary["volumes"]
    seg.min_component_share = rule["min_component_share"]
    after = evaluate_model(seg, root, split="test", ceiling=False).summary["volumes"]
    assert before["min_component_share"] == 0.0 and after["min_component_share"] == 0.05
    assert after["dice"] == pytest.approx(rows[0.05]["dice"])
    assert after["dice"] > before["dice"] == pytest.approx(rows[0.0]["dice"])
    assert (
        before["components"]
        == after["components"]
        == [{k: v for k, v in r.items() if k != "hd95_mm"} for r in rule["candidates"]]
    )
    given = evaluate_model(seg, root, split="test", ceiling=False, min_component_share=0.0)
    assert given.summary["volumes"]["dice"] == pytest.approx(before["dice"])
    from rich.console import Console

    from mrisegcli.evaluation import EvalReport, render_volume_table

    seg.min_component_share = 0.05
    ruled = evaluate_model(seg, root, split="test", ceiling=False)
    console = Console(record=True, width=200)
    console.print(
        render_volume_table(EvalReport(ruled.cases, ruled.summary, volumes=ruled.volumes))
    )
    assert "components below 0.05 of the largest dropped" in " ".join(console.export_text().split())

    (tmp_path / "flat").mkdir()
    with pytest.raises(MrisegError):
        fit_component_rule(seg, tmp_path / "flat")


def test_the_shipped_brain_model_records_its_rule_and_predict_applies_it(tmp_path):
    """The shipped brain model carries the share chosen on the lgg-flair val volumes; on a val
    patient's volume the mask it writes is the decoder's stack less its small components."""
    from pathlib import Path

    from scipy import ndimage

    import mrisegcli
    from mrisegcli.workflow.segmenter import Segmenter

    shipped = Path(mrisegcli.__file__).parent / "shipped" / "brain-mri"
    if not shipped.is_dir():
        pytest.skip("no brain-mri model in this installation")
    rule = json.loads((shipped / "config.json").read_text())["postprocess"]
    assert [r["min_component_share"] for r in rule["candidates"]] == list(CANDIDATE_SHARES)
    assert rule["min_component_share"] == choose_min_share(rule["candidates"]) > 0
    seg = Segmenter.load("brain-mri")
    assert seg.min_component_share == rule["min_component_share"]
    from mrisegcli.report_lines import scope_json, scope_lines

    config = json.loads((shipped / "config.json").read_text())
    assert scope_lines("brain-mri", config)[-1] == (  # mriseg models brain-mri
        f"volumes: 3-D components below {rule['min_component_share']:g} of the largest dropped "
        "(chosen on 8 validation volumes)"
    )
    assert scope_json("brain-mri", config)["min_component_share"] == rule["min_component_share"]
    volume = Path(__file__).resolve().parents[2] / "shared/data/lgg-flair/volumes/imagesTs"
    volume = volume / "TCGA_FG_6691_0000.nii.gz"  # a val patient
    if not volume.is_file():
        pytest.skip("no lgg-flair volumes here")
    (ruled,) = run_predict(seg, [volume], "FLAIR hyperintense lesion", out_dir=tmp_path / "a")
    (stack,) = run_predict(seg, [volume], "FLAIR hyperintense lesion", out_dir=tmp_path / "b",
                           min_component_share=0.0)  # fmt: skip
    a = np.asarray(nib.load(ruled.outputs["mask"]).dataobj) > 0
    b = np.asarray(nib.load(stack.outputs["mask"]).dataobj) > 0
    np.testing.assert_array_equal(a, drop_small_components(b, rule["min_component_share"]))
    assert (
        a.any()
        and ndimage.label(a, np.ones((3, 3, 3)))[1] <= ndimage.label(b, np.ones((3, 3, 3)))[1]
    )

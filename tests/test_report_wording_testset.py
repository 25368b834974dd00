"""examples/report_wording_testset.py: the report-wording rows are words training never uses,
and its control set (--control) asks the same rows in the training paraphraser's words."""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

import numpy as np
from PIL import Image

from mrisegcli.data.paraphrase import paraphrase

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "report_wording_testset.py"
ROWS = [  # (split, kind, target, text)
    ("train", "describe", "infection:all", "Bilateral pulmonary infection, two infected areas."),
    ("train", "side", "infection:left", "Pulmonary infection in the left lung."),
    ("train", "anatomy", "lung:both", "both lungs"),
    ("test", "describe", "infection:all", "Unilateral pulmonary infection, one infected area."),
    ("test", "side", "infection:right", "Pulmonary infection in the right lung."),
    ("test", "zone", "infection:left:lower", "Infection in the lower zone of the left lung."),
    ("test", "anatomy", "lung:left", "left lung"),
    ("test", "absent", "none", "Pulmonary infection in the left lung."),
]


def _script():
    spec = importlib.util.spec_from_file_location("report_wording_testset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data(root: Path) -> Path:
    src = root / "cxr-infection"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rows = []
    for i, (split, kind, target, text) in enumerate(ROWS):
        Image.fromarray(np.full((16, 16), 40 + i, np.uint8)).save(src / "images" / f"{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(src / "masks" / f"{i}.png")
        rows.append(
            {
                "image": f"images/{i}.png",
                "mask": f"masks/{i}.png",
                "text": text,
                "split": split,
                "kind": kind,
                "target": target,
            }  # fmt: skip
        )
    with open(src / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def _read(path: Path) -> list[dict]:
    with open(path / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_report_wording_and_its_paraphraser_control(tmp_path: Path) -> None:
    rw = _script()
    data = _data(tmp_path / "data")
    rw.write_domain(data, tmp_path / "chest", "chest", seed=0)
    rw.write_domain(data, tmp_path / "control", "chest", seed=0, control=True)
    report, control = _read(tmp_path / "chest"), _read(tmp_path / "control")
    test_rows = [r for r in ROWS if r[0] == "test"]
    for out in (report, control):  # the same test rows, images and targets in both
        assert [(r["kind"], r["target"]) for r in out] == [(k, t) for _, k, t, _ in test_rows]
        assert all((tmp_path / "chest" / r["image"]).is_file() for r in out)
    with open(data / "cxr-infection" / "manifest.csv", newline="") as f:
        seen = rw.training_wordings(list(csv.DictReader(f)))
    assert not any(r["text"].lower() in seen for r in report)  # words training never uses
    for r in control:  # the control: a wording the training paraphraser makes of the target
        rng = random.Random(0)
        made = {paraphrase(r["target"], rng, r["text"]).lower() for _ in range(3000)}
        assert r["text"].lower() in made, r
    assert [r["text"] for r in report] != [r["text"] for r in control]

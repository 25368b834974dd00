"""Manifests with several rows per image, several datasets at once, synonym folding in the text
tokenizer, training rewordings from the ``target`` column, and the text context never cut."""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrisegcli.data.layouts import load_dataset
from mrisegcli.data.paraphrase import add_paraphrases, paraphrase, side_of
from mrisegcli.errors import InputError, MrisegError
from mrisegcli.tokenizers.text import encode_texts, train_text_tokenizer
from mrisegcli.workflow.prepare import open_dataset


def _png(path: Path, box: tuple[int, int] | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((16, 16), 90, np.uint8)
    if box is not None:
        arr[:] = 0
        arr[box[0] : box[0] + 4, box[1] : box[1] + 4] = 255
    Image.fromarray(arr).save(path)
    return path.name


def multi_row_manifest(root: Path, rows: list[tuple[str, str, str, str, str, str]]) -> Path:
    """rows: (image, mask, text, split, kind, target); files are created."""
    for image, mask, *_ in rows:
        _png(root / image)
        _png(root / mask, box=(len(mask) % 8, 2))
    path = root / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "text", "split", "kind", "target", "reader"])
        for r in rows:
            w.writerow([*r, "dr. x"])  # an extra column: ignored
    return path


ROWS = [
    (
        "images/a.png",
        "masks/a_describe.png",
        "Bilateral pulmonary infection.",
        "train",
        "describe",
        "infection:all",
    ),
    (
        "images/a.png",
        "masks/a_side.png",
        "Pulmonary infection in the left lung.",
        "train",
        "side",
        "infection:left",
    ),
    ("images/a.png", "masks/a_lung.png", "left lung", "train", "anatomy", "lung:left"),
    (
        "images/b.png",
        "masks/b_describe.png",
        "Unilateral pulmonary infection.",
        "val",
        "describe",
        "infection:all",
    ),
    (
        "images/c.png",
        "masks/c_zone.png",
        "Infection in the lower zone of the right lung.",
        "test",
        "zone",
        "infection:right:lower",
    ),
]


def test_manifest_with_several_rows_per_image_loads(tmp_path: Path) -> None:
    path = multi_row_manifest(tmp_path, ROWS)
    ds = open_dataset(path, None)  # validates: no duplicate ids, every file readable
    ids = [s.id for s in ds.samples]
    assert ids == ["masks/a_describe", "masks/a_side", "masks/a_lung", "images/b", "images/c"]
    assert [s.kind for s in ds.samples][:3] == ["describe", "side", "anatomy"]
    assert ds.samples[1].target == "infection:left"
    assert ds.splits() == {"train": 3, "val": 1, "test": 1}


def test_rows_without_masks_of_one_image_get_row_numbers(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    (tmp_path / "m.jsonl").write_text(
        '{"image": "x.png", "text": "heart"}\n{"image": "x.png", "text": "left lung"}\n'
    )
    ds = load_dataset(tmp_path / "m.jsonl")
    assert [s.id for s in ds.samples] == ["x#1", "x#2"]


def test_an_image_in_two_splits_is_a_leak(tmp_path: Path) -> None:
    rows = [
        *ROWS[:2],
        ("images/a.png", "masks/a_other.png", "left lung", "test", "anatomy", "lung:left"),
    ]
    path = multi_row_manifest(tmp_path, rows)
    with pytest.raises(InputError, match=r"images/a.png.*'test'.*row 2.*'train'.*leaks"):
        load_dataset(path)


def test_several_datasets_merge_with_prefixed_ids(tmp_path: Path) -> None:
    a = multi_row_manifest(tmp_path / "cxr", ROWS)
    b = multi_row_manifest(tmp_path / "jsrt", ROWS[:1])
    ds = open_dataset([a.parent, b], None)
    ids = [s.id for s in ds.samples]
    assert len(ids) == len(set(ids)) == 6
    assert ids[0] == "cxr/masks/a_describe" and ids[-1] == "jsrt/images/a"
    with pytest.raises(MrisegError, match="does not exist"):
        open_dataset([a, tmp_path / "nope"], None)


@pytest.mark.parametrize(
    "target",
    [
        "infection:all",
        "infection:left",
        "infection:left+right:lower",
        "infection:right:middle",
        "lung:both",
        "lung:left",
        "none",
        "heart",
        "left_lung",
        "right_clavicle",
        "nodule:left:upper",
        "nodule:right:",
    ],
)
def test_every_known_target_gets_varied_wordings(target: str) -> None:
    rng = random.Random(0)
    texts = {paraphrase(target, rng) for _ in range(60)}
    assert None not in texts and len(texts) >= 4
    side = target.split(":")[1] if ":" in target else target.split("_")[0]
    if side in ("left", "right"):  # the side is never lost or swapped
        other = "right" if side == "left" else "left"
        assert all(side in t and other not in t for t in texts), texts
    assert paraphrase("spleen", rng) is None
    assert not any("the the" in t or "the both" in t for t in texts), texts
    many = {paraphrase(target, rng) for _ in range(400)}  # no word said twice by a prefix
    assert not any("pulmonary pulmonary" in t or "lung pulmonary" in t for t in many), many


def test_some_wordings_sit_in_a_request_frame() -> None:
    rng = random.Random(1)
    texts = [paraphrase("left_lung", rng) for _ in range(400)]
    framed = [t for t in texts if "radiograph" in t or "locate" in t or "please" in t]
    assert 0.1 < len(framed) / len(texts) < 0.5
    assert all("left" in t and "right" not in t for t in texts)
    # ten of the thirteen frames change the wording: about three in four (docs/cxr_model.md)
    frame = re.compile(  # the frames of a left-lung request (none of its wordings ends in "area")
        r"^((locate|mask of|can you find|region of) (the )?|visible )|, please$"
        r"|( on this radiograph| on the chest x-ray| area|, frontal chest film)$"
    )
    changed = sum(bool(frame.search(t)) for t in texts)
    assert 0.65 < changed / len(texts) < 0.9


def test_side_of_names_the_side_a_sentence_names() -> None:
    assert side_of("FLAIR hyperintense lesion in the Left hemisphere.") == "left"
    assert side_of("bilateral lesion") == side_of("lesion on both sides") == "both"
    assert side_of("left and right lesions") == side_of("FLAIR lesion") == ""
    assert side_of("rightward shift") == ""  # whole words only


def test_paraphrases_are_added_to_training_rows_only_and_reproducibly(tmp_path: Path) -> None:
    ds = load_dataset(multi_row_manifest(tmp_path, ROWS))
    more = add_paraphrases(ds, 2, seed=3)
    extra = more.samples[len(ds.samples) :]
    assert len(extra) == 2 * 3  # three training rows with a target, two copies each
    assert {s.split for s in extra} == {"train"}
    assert extra[0].id == "masks/a_describe~p1" and extra[0].mask == ds.samples[0].mask
    again = add_paraphrases(ds, 2, seed=3).samples[len(ds.samples) :]
    assert [s.text for s in again] == [s.text for s in extra]
    assert add_paraphrases(ds, 0) is ds


def test_synonyms_fold_users_wordings_onto_training_words() -> None:
    tok = train_text_tokenizer(
        [
            "Infection in the lower zones of both lungs.",
            "Pulmonary infection in the right lung.",
            "Infection in the middle zone of the left lung.",
            "left lung",
            "heart",
        ]
    )
    norm = tok.backend_tokenizer.normalizer.normalize_str
    assert norm("bilateral lower lobe opacity") == "bilateral lower zone infection"
    assert norm("right-sided consolidation") == "right infection"
    assert norm("ground-glass opacity in the left mid zone") == "infection in the left middle zone"
    assert norm("the left lung field") == "the left lung"
    assert norm("cardiac silhouette") == "heart"
    assert norm("GGO in the RLL") == "infection in the right lower zone"
    assert norm("opacity in the left apical zone") == "infection in the left upper zone"
    assert norm("right basal zones") == "right lower zones"  # not "lower zone zones"
    assert norm("nodule at the right apex") == "nodule at the right upper zone"
    # organs named by their outline, tissue or a plural; questions and the picture they ask of
    squash = lambda t: " ".join(norm(t).split())  # noqa: E731
    assert squash("silhouette of the heart") == squash("cardiomediastinal contour") == "heart"
    assert squash("both hemithoraces") == squash("left and right lungs") == "both lungs"
    assert squash("left lung parenchyma") == "left lung"
    assert squash("Where is the heart?") == "the heart?"
    assert squash("Can you show me the heart on this radiograph") == "the heart"
    assert squash("opacity in the image of the right lung") == "infection of the right lung"
    # every word of a folded prompt is a whole word of the vocabulary: nothing falls to pieces
    ids, _ = encode_texts(tok, ["right-sided consolidation", "cardiac silhouette"], 8)
    vocab = tok.get_vocab()
    assert ids[0, :2].tolist() == [vocab["right"], vocab["infection"]]
    assert ids[1, 0] == vocab["heart"]
    # words of other domains are left alone
    assert (
        norm("two polyps: small polyp in the upper centre.")
        == "two polyps: small polyp in the upper centre."
    )
    plain = train_text_tokenizer(["left lung"], synonyms=False)
    assert (
        plain.backend_tokenizer.normalizer.normalize_str("cardiac silhouette")
        == "cardiac silhouette"
    )


def test_training_lengthens_the_text_context_instead_of_cutting(tmp_path: Path) -> None:
    from mrisegcli.config import RunConfig
    from mrisegcli.workflow.bundle import TokenizerBundle
    from mrisegcli.workflow.train import fit_text_len

    long_text = " ".join(["upper middle lower left right lung"] * 8)  # 48 words
    rows = [(*ROWS[0][:2], long_text, *ROWS[0][3:]), *ROWS[1:]]
    ds = load_dataset(multi_row_manifest(tmp_path, rows))
    bundle = TokenizerBundle(text=train_text_tokenizer([s.text for s in ds.samples]))
    cfg = fit_text_len(RunConfig(text_len=32), bundle, ds)
    assert cfg.text_len == 48
    assert fit_text_len(RunConfig(text_len=64), bundle, ds).text_len == 64


def test_train_cli_paraphrases_and_text_len(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from mrisegcli.cli import app

    path = multi_row_manifest(tmp_path / "d", ROWS)
    run = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(path),
            "--out",
            str(run),
            "--size",
            "32",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--mask-steps",
            "5",
            "--eval-every",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--paraphrases",
            "2",
            "--text-len",
            "4",
            "-q",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["paraphrases"] == 2
    assert (
        cfg["run"]["text_len"] >= 8
    )  # 4 asked, lengthened to fit the longest text (a multiple of 8)
    assert cfg["data"]["splits"]["train"] == 3 + 6  # three rows and two rewordings of each
    index = json.loads((run / "cache" / "index.json").read_text())
    assert sum("~p" in key for key in json.dumps(index).split('"')) == 6  # two per training row


def test_predict_no_speculative_gives_the_same_mask(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mrisegcli.cli import app

    png = tmp_path / "x.png"
    Image.fromarray((np.indices((96, 96)).sum(0) % 255).astype(np.uint8)).save(png)
    masks = []
    for flag in ("--speculative", "--no-speculative"):
        out = tmp_path / flag.strip("-")
        r = CliRunner().invoke(
            app,
            [
                "predict",
                str(png),
                "--text",
                "left lung",
                "--out",
                str(out),
                flag,
                "--device",
                "cpu",
                "-q",
            ],
        )
        assert r.exit_code == 0, r.output
        masks.append(np.asarray(Image.open(out / "x_mask.png")))
    assert np.array_equal(*masks)

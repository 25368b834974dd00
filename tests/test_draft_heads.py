"""Drafting heads refitted to the model's own greedy codes: fewer verifying passes, the same
codes; and ``mriseg draft-heads`` writes a new run folder without touching the source."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from test_cli_pipeline import TINY, invoke
from test_speculative import G, _batch, _trained

from mrisegcli.decode.next_token import generate_masks, generate_masks_speculative
from mrisegcli.training.draft_heads import (
    collect_states,
    draft_runs,
    fit_draft_heads,
    greedy_states,
    passes_per_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _inputs(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return b["image_codes"], b["text_ids"], b["text_mask"]


def test_passes_per_mask_counts_what_speculative_decoding_does() -> None:
    N = G * G
    assert passes_per_mask(torch.zeros(3, N, dtype=torch.long)) == N - 1  # nothing kept
    # 3 drafts kept from every state: 4 codes per pass, the last code needs no pass
    assert passes_per_mask(torch.full((1, N), 3)) == 4
    runs = torch.zeros(1, N, dtype=torch.long)
    runs[0, 0] = 14  # one pass takes codes 0..14, code 15 is the last: no pass
    assert passes_per_mask(runs) == 1


def test_states_are_what_decoding_sees() -> None:
    model = _trained("bidirectional", nktp_k=2)
    codes, h = greedy_states(model, *_inputs(_batch(6, torch.Generator().manual_seed(3))))
    assert h.shape[:2] == codes.shape == (6, G * G)
    # the main head on state n chooses greedy code n
    assert torch.equal(model.draft_logits(h)[..., 0, :].argmax(-1), codes)


def test_refitted_heads_draft_more_and_keep_the_codes() -> None:
    model = _trained("bidirectional", nktp_k=2)
    g = torch.Generator().manual_seed(11)
    train = collect_states(model, [_inputs(_batch(32, g)) for _ in range(4)])
    val = collect_states(model, [_inputs(_batch(32, g))])
    test = _inputs(_batch(16, torch.Generator().manual_seed(5)))

    def passes() -> float:
        total = 0.0
        for i in range(16):
            stats: dict[str, float] = {}
            one = [t[i : i + 1] for t in test]
            fast = generate_masks_speculative(model, *one, stats=stats)
            assert torch.equal(fast, generate_masks(model, *one))
            total += stats["passes"]
        return total / 16

    before = passes()
    w = model.mask_head.weight.detach()
    predicted = passes_per_mask(draft_runs(model.nktp, w, *val[::-1]))
    heard: list[tuple] = []
    report = fit_draft_heads(
        model, train, val, k=4, steps=300, seed=0, progress=lambda *a: heard.append(a)
    )
    assert [h[0] for h in heard] == list(range(100, 301, 100)) and heard[0][1] == 300
    assert report.val_passes_per_mask <= min(h[2]["val_passes"] for h in heard)  # or step 0
    assert report.k_before == 2 and report.k == 4 and model.nktp.k == 4
    assert model.config.nktp_k == 4
    assert report.val_passes_per_mask_before == pytest.approx(predicted)
    assert report.val_passes_per_mask < 0.8 * report.val_passes_per_mask_before
    assert len(report.val_head_accuracy) == 3
    after = passes()  # speculative decoding with the new heads: same codes (checked), fewer passes
    assert after < 0.8 * before


def test_heads_that_do_not_help_are_not_installed() -> None:
    model = _trained("bidirectional", nktp_k=3)
    g = torch.Generator().manual_seed(2)
    train = collect_states(model, [_inputs(_batch(16, g))])
    val = collect_states(model, [_inputs(_batch(16, g))])
    heads = model.nktp
    report = fit_draft_heads(model, train, val, k=2, steps=1, seed=0)  # 1 step, fewer heads
    assert report.k == report.k_before == 3 and model.nktp is heads


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_writes_a_new_run_and_keeps_the_source(tmp_path: Path) -> None:
    data = tmp_path / "data"
    invoke(["synth", str(data), "--n-train", "24", "--n-val", "8", "--n-test", "4", "--size", "32"])
    run = tmp_path / "run"
    invoke(["train", "--data", str(data), "--out", str(run), "--paradigm", "next-token", *TINY])
    before = {p.name: _sha(p) for p in run.iterdir() if p.is_file()}
    out = tmp_path / "fast"
    args = ["draft-heads", "--model", str(run), "--data", str(data), "--out", str(out)]
    r = invoke([*args, "--heads", "4", "--steps", "40", "--device", "cpu", "--json"])
    report = json.loads(r.stdout)
    assert {p.name: _sha(p) for p in run.iterdir() if p.is_file()} == before  # untouched
    from safetensors import safe_open

    def keys(folder: Path) -> set[str]:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return set(f.keys())

    assert keys(run) <= keys(out) and all(k.startswith("nktp.") for k in keys(out) - keys(run))
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["nktp_k"] == report["k"] == config["run"]["strategies"]["nktp_k"]
    assert config["draft_heads"]["val_sequences"] == 8  # the val split selects
    assert report["val_passes_per_mask"] <= report["val_passes_per_mask_before"]
    assert report["identical_codes_checked"] == 8

    # the new folder predicts the same mask as the source
    image = sorted((data / "Test_Folder" / "img").iterdir())[0]
    masks = []
    for folder in (run, out):
        dest = tmp_path / f"pred-{folder.name}"
        r = invoke(["predict", str(image), "--model", str(folder), "--text", "circle", "--out",
                    str(dest), "--device", "cpu", "--json", "--force"])  # fmt: skip
        row = json.loads(r.stdout.strip().splitlines()[-1])
        masks.append(Path(row["outputs"]["mask"]).read_bytes())
    assert masks[0] == masks[1]

    # never over a non-empty folder without --overwrite, never onto the source
    r = invoke([*args, "--heads", "3", "--steps", "5", "--device", "cpu"], ok=False)
    errors = [line for line in r.output.splitlines() if "error" in line]
    assert r.exit_code != 0 and len(errors) == 1 and "--overwrite" in errors[0]
    assert json.loads((out / "config.json").read_text())["draft_heads"]["steps"] == 40  # kept
    r = invoke([*args[:-1], str(run), "--steps", "5", "--device", "cpu"], ok=False)
    assert r.exit_code != 0 and "source run" in r.output
    r = invoke([*args, "--heads", "3", "--steps", "5", "--device", "cpu", "--overwrite", "--json"])
    assert json.loads((out / "config.json").read_text())["draft_heads"]["steps"] == 5

    # --max-cases draws a subset of the train split; without a val split the loader carves one
    # (a tenth of the 12 train cases) from train, as for training
    noval = tmp_path / "noval"
    invoke(
        ["synth", str(noval), "--n-train", "12", "--n-val", "0", "--n-test", "2", "--size", "32"]
    )
    r = invoke(["draft-heads", "--model", str(run), "--data", str(noval), "--out",
                str(tmp_path / "sub"), "--max-cases", "10", "--steps", "5", "--device", "cpu",
                "--json"])  # fmt: skip
    sub = json.loads(r.stdout)
    assert (sub["train_sequences"], sub["val_sequences"]) == (10, 1)


def test_cli_refuses_a_next_scale_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    invoke(["synth", str(data), "--n-train", "8", "--n-val", "2", "--n-test", "2", "--size", "32"])
    run = tmp_path / "run"
    invoke(["train", "--data", str(data), "--out", str(run), "--paradigm", "next-scale", *TINY])
    r = invoke(
        ["draft-heads", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "o")],
        ok=False,
    )
    assert r.exit_code != 0 and "next-token" in r.output
    assert not (tmp_path / "o").exists()

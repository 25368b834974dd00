"""Smoke test of the benchmark scripts: each runs at the smallest settings and prints its JSON.

All three run in ONE child Python process, one after the other, each as ``__main__`` with its
own argv (``runpy``), its exit status, stdout and stderr kept apart: most of a script's time at
these settings is importing torch (and torch's compiler, which the optimiser pulls in), which a
shared process pays once, keeping the file well under 30 s on a busy 2-core machine. Settings:
32 px (a 4x4 mask grid), batch 2, one thread, no warm-up.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SMALL = [
    "--preset",
    "tiny",
    "--size",
    "32",
    "--batch",
    "2",
    "--warmup",
    "0",
    "--repeats",
    "1",
    "--threads",
    "1",
    "--device",
    "cpu",
    "--json",
]
RUNS = {
    "decode": ["bench_decode.py", "--uncached-tokens", "4", "--matmul-size", "64"],
    "train": ["bench_train.py", "--steps", "1", "--matmul-size", "64"],
    "predict": ["bench_predict.py", "--png-size", "40"],
}
TINY_LAYERS, TINY_DIM = 4, 192  # the tiny preset's transformer


# Runs each script given as JSON [[name, path, argv], ...] on stdin; prints one JSON object
# {name: {"code", "stdout", "stderr"}}. A traceback counts as exit status 1.
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
from pathlib import Path
real_stdout, results = sys.stdout, {}
for name, path, argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [path, *argv]
    sys.path.insert(0, str(Path(path).parent))
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    sys.path.pop(0)
    results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results), file=real_stdout)
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    tmp = tmp_path_factory.mktemp("bench")
    jobs = [
        [name, str(BENCH / script), [*SMALL, *extra, "--out", str(tmp / f"{name}.json")]]
        for name, (script, *extra) in RUNS.items()
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout)
    return {
        name: (
            subprocess.CompletedProcess(
                path, runs[name]["code"], runs[name]["stdout"], runs[name]["stderr"]
            ),
            tmp / f"{name}.json",
        )
        for name, path, _ in jobs
    }


def _result(outputs, name: str) -> dict:
    proc, out = outputs[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "with --json stdout holds exactly the JSON line"
    data = json.loads(lines[0])
    assert json.loads(out.read_text()) == data  # --out writes the same object
    assert data["bench"] == name
    assert data["machine"]["device"] == "cpu" and data["machine"]["torch_threads"] == 1
    assert proc.stderr.strip(), "the readable lines go to stderr with --json"
    return data


def test_decode(outputs):
    d = _result(outputs, "decode")
    nt, ns, s = d["next_token"], d["next_scale"], d["summary"]
    assert nt["n_mask_tokens"] == 16 and nt["mask_grid"] == 4
    assert s["forward_passes_next_token"] == 1 + (16 - 1)  # prefill + one step per further token
    assert ns["scales"] == [1, 2, 3, 4]
    assert s["forward_passes_next_scale"] == 1 + (4 - 1)  # prefill + one step per further scale
    assert s["greedy_identical"] is True
    unc = nt["uncached"]
    assert unc["estimated"] is True and unc["measured_steps"] == [0, 5, 10, 15]
    assert unc["kv_speedup"] == pytest.approx(unc["seconds"] / nt["cached"]["median_s"])
    for key in (
        "kv_speedup_next_token",
        "kv_speedup_next_scale",
        "next_scale_over_next_token_time",
        "masks_per_s_next_token_cached",
        "masks_per_s_next_scale_cached",
    ):
        assert s[key] > 0, key
    assert nt["cached"]["memory"]["rss_peak_mb"] >= nt["cached"]["memory"]["rss_start_mb"] > 0
    # next-scale's arithmetic: the prefill (condition + scale 0), then one pass per later scale
    ar = ns["arithmetic"]
    passes = [ns["cond_len"] + 1, 4, 9, 16]
    assert ar["tokens_per_mask"] == sum(passes)
    keys = [sum(passes[: i + 1]) for i in range(len(passes))]
    attention = sum(4 * TINY_LAYERS * TINY_DIM * n * k for n, k in zip(passes, keys, strict=True))
    qkvo = 2 * 4 * TINY_LAYERS * TINY_DIM**2 * sum(passes)  # the attention projections alone
    assert ar["flops_per_mask"] > attention + qkvo
    peak = ar["matmul_peak"]["flops_per_s"]
    assert ar["fraction_of_peak"] == pytest.approx(ar["flops_per_s"] / peak)
    parts = ns["parts_ms_per_mask"]
    assert ar["flops_per_s"] == pytest.approx(
        ar["flops_per_mask"] / (1e-3 * parts["transformer_and_rest"])
    )
    assert ar["ms_per_mask_at_peak"] == pytest.approx(
        1e3 * ar["flops_per_mask"] / peak + parts["image_encoder"] + parts["quantiser"]
    )
    assert s["next_scale_speedup_bound_at_peak"] == pytest.approx(
        d["head_to_head"]["next_token"]["ms_per_mask"] / ar["ms_per_mask_at_peak"]
    )
    assert s["next_scale_fraction_of_peak"] == ar["fraction_of_peak"]
    # bf16 next-scale decoding is timed where the CPU multiplies bf16 natively, never elsewhere
    from mrisegcli.training.loop import cpu_has_native_bf16

    if cpu_has_native_bf16():
        bf = ns["bf16"]
        assert bf["speedup_vs_fp32"] == s["next_scale_bf16_speedup_vs_fp32"] > 0
        assert 0 <= bf["codes_same_as_fp32"] <= 1
        assert bf["ms_per_mask"] == pytest.approx(1e3 * bf["median_s"] / d["args"]["batch"])
    else:
        assert "bf16" not in ns and s["next_scale_bf16_speedup_vs_fp32"] is None


def test_train(outputs):
    d = _result(outputs, "train")
    assert d["matmul_peak"]["float32"]["flops_per_s"] > 0
    for name in ("next_token", "next_scale"):
        r = d["results"][name]
        T, B = r["seq_len"], 2
        assert r["flops_per_step"] == B * (
            6 * r["params_blocks"] * T + 12 * TINY_LAYERS * T**2 * TINY_DIM
        )
        assert r["tokens_per_s"] == pytest.approx(
            B * r["predicted_tokens_per_sample"] / r["step_s"]
        )
        assert r["fraction_of_peak"] == pytest.approx(
            r["flops_per_s"] / d["matmul_peak"]["float32"]["flops_per_s"]
        )
        assert 0 < r["params_blocks"] < r["params_total"]
        assert r["memory"]["rss_peak_mb"] > 0
    assert d["results"]["next_token"]["predicted_tokens_per_sample"] == 16
    assert d["results"]["next_scale"]["predicted_tokens_per_sample"] == 1 + 4 + 9 + 16


def test_train_under_cpu_bf16(tmp_path: Path) -> None:
    """``--cpu-bf16`` runs the step as ``mriseg train --cpu-bf16`` does and takes the fraction
    against the bf16 peak, measured in the same run (float32 where the CPU has no native bf16)."""
    from mrisegcli.training.loop import cpu_has_native_bf16

    sys.path.insert(0, str(BENCH))
    try:
        import bench_train
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "train.json"
    argv = [*SMALL, "--steps", "1", "--matmul-size", "64", "--paradigm", "next-token"]
    assert bench_train.main([*argv, "--cpu-bf16", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    r, native = d["results"]["next_token"], cpu_has_native_bf16()
    assert r["amp_bf16"] is native and r["peak_dtype"] == ("bfloat16" if native else "float32")
    assert d["matmul_peak"]["bfloat16"]["flops_per_s"] > 0
    assert r["fraction_of_peak"] == pytest.approx(
        r["flops_per_s"] / d["matmul_peak"][r["peak_dtype"]]["flops_per_s"]
    )


def test_predict(outputs):
    d = _result(outputs, "predict")
    for name in ("next_token", "next_scale"):
        r = d["results"][name]
        assert r["batch1"]["ms_per_image"] > 0
        assert r["batch_n"]["batch"] == 2 and r["batch_n"]["images_per_s"] > 0
        e2e = r["end_to_end_png"]
        parts = e2e["runs"][0]
        assert parts["total_s"] == pytest.approx(
            parts["read_s"] + parts["inputs_s"] + parts["predict_s"] + parts["write_s"]
        )
        assert e2e["png_size"] == 40
    assert d["process_peak_rss_mb"] > 0


def test_unet_baseline_and_comparison_table(tmp_path: Path) -> None:
    """The U-Net baseline trains within its budget and scores like ``mriseg evaluate``; the
    comparison grid renders its table from result lines."""
    pytest.importorskip("monai")
    sys.path.insert(0, str(BENCH))
    try:
        import baseline_unet
        import compare
    finally:
        sys.path.remove(str(BENCH))
    from typer.testing import CliRunner

    from mrisegcli.cli import app

    data = tmp_path / "data"
    assert (
        CliRunner()
        .invoke(
            app,
            [
                "synth",
                str(data),
                "--n-train",
                "16",
                "--n-val",
                "4",
                "--n-test",
                "4",
                "--size",
                "32",
                "-q",
            ],
        )
        .exit_code
        == 0
    )
    out = baseline_unet.main(
        [
            "--data",
            str(data),
            "--size",
            "32",
            "--max-minutes",
            "0.05",
            "--max-steps",
            "4",
            "--eval-every",
            "2",
            "--threads",
            "1",
            "--features",
            "4",
            "4",
            "8",
            "8",
            "8",
            "4",
        ]
    )
    assert out["steps"] == 4 and out["n"] == 4 and 0 <= out["dice"] <= 1 and out["model"] == "unet"
    assert 0 <= out["best_val_dice"] <= 1
    tiny = ["--features", "4", "4", "8", "8", "8", "4", "--threads", "1", "--max-steps", "2"]
    augmented = baseline_unet.main(["--data", str(data), "--size", "32", "--augment", "1", *tiny])
    assert augmented["model"] == "unet@aug" and augmented["augment"] == 1.0
    assert augmented["precision"] == "fp32"
    from mrisegcli.training.loop import cpu_has_native_bf16

    bf16 = baseline_unet.main(["--data", str(data), "--size", "32", "--cpu-bf16", *tiny])
    assert bf16["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert bf16["steps"] == 2 and 0 <= bf16["dice"] <= 1
    with pytest.raises(SystemExit):  # a share outside [0, 1]
        baseline_unet.main(["--data", str(data), "--size", "32", "--augment", "1.5", *tiny])
    results = tmp_path / "r.jsonl"
    rows = [
        {
            "key": "kvasir-seg:unet:5",
            "dataset": "kvasir-seg",
            "model": "unet",
            "max_minutes": 5,
            "dice": 0.70,
            "steps": 900,
        },
        {
            "key": "kvasir-seg:next-token:5",
            "dataset": "kvasir-seg",
            "model": "next-token",
            "max_minutes": 5,
            "dice": 0.72,
            "steps": 300,
        },
    ]
    rows.append(
        {
            "key": "kvasir-seg:next-token@refine:5",
            "dataset": "kvasir-seg",
            "model": "next-token",
            "method": "next-token@refine",
            "max_minutes": 5,
            "dice": 0.75,
            "steps": 250,
            "load": [2.0, 2.5],
            "parts": {"tokens": {"dice": 0.61}, "refined": {"dice": 0.75}},
        }
    )
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "unet@aug" not in compare.table(results)
    rows.append(
        {
            "key": "jsrt:unet@aug:15",
            "dataset": "jsrt",
            "model": "unet@aug",
            "method": "unet@aug",
            "max_minutes": 15,
            "dice": 0.83,
            "steps": 2000,
        }
    )
    rows.append({**rows[0], "key": "jsrt:unet:15", "dataset": "jsrt", "max_minutes": 15})
    rows.append(
        {**rows[2], "key": "jsrt:next-token@refine:15", "dataset": "jsrt", "max_minutes": 15}
    )
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = compare.table(results)
    # the lead is over the better U-Net: 0.75 - 0.83
    assert (
        "| U-Net + text Dice | U-Net + text, --augment 0.8 Dice | mriseg next-token Dice" in table
    )
    assert "| jsrt | 15 min | 0.700 (900 steps) | 0.830 (2000 steps) | - |" in table
    assert "| -0.080 |" in table
    # one column per method (rows written before variants count as their model), the best
    # mriseg method's lead over the U-Net, the token-only Dice beside a refined one, the load
    assert (
        "| mriseg next-token Dice | mriseg next-token@refine Dice | mriseg lead | load |" in table
    )
    assert (
        "| kvasir-seg | 5 min | 0.700 (900 steps) | - | 0.720 (300 steps) "
        "| 0.750 (250 steps), tokens only 0.610 | +0.050 | 2.0-2.5 |"
    ) in table
    # a U-Net variant is a U-Net column and counts for the lead
    rows.append(
        {**rows[3], "key": "jsrt:unet@bf16-aug:15", "method": "unet@bf16-aug", "dice": 0.86}
    )
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = compare.table(results)
    assert "| U-Net + text @bf16-aug Dice | mriseg next-token Dice" in table
    assert "| -0.110 |" in table
    assert compare.done_keys(results) == {
        "jsrt:unet@bf16-aug:15",
        "kvasir-seg:unet:5",
        "kvasir-seg:next-token:5",
        "kvasir-seg:next-token@refine:5",
        "jsrt:unet@aug:15",
        "jsrt:unet:15",
        "jsrt:next-token@refine:15",
    }


def test_fixed_steps_runs_each_variant_from_the_reference_tokenizers(tmp_path: Path) -> None:
    """Every variant trains the same steps from the reference run's tokenizers and code cache
    and is scored on the test split; the row records what it ran."""
    sys.path.insert(0, str(BENCH))
    try:
        import fixed_steps
    finally:
        sys.path.remove(str(BENCH))
    from typer.testing import CliRunner

    from mrisegcli.cli import app

    data, ref = tmp_path / "data", tmp_path / "ref"
    runner = CliRunner()
    synth = ["synth", str(data), "--n-train", "16", "--n-val", "4", "--n-test", "4"]
    assert runner.invoke(app, [*synth, "--size", "32", "-q"]).exit_code == 0
    base = "--preset cpu --size 32 --batch-size 8 --lambda-refine 1 --workers 0"
    r = runner.invoke(
        app,
        ["train", "--data", str(data), "--out", str(ref), *base.split(), "--steps", "2"]
        + ["--mask-steps", "20", "--device", "cpu", "-q"],
    )
    assert r.exit_code == 0, r.output
    results = tmp_path / "fixed.jsonl"
    rows = fixed_steps.main(
        [
            "--data",
            str(data),
            "--reference",
            str(ref),
            "--steps",
            "3",
            "--eval-every",
            "3",
            "--base-options",
            base,
            "--variant",
            "base=",
            "--variant",
            "cell=--mask-positions target --mask-cell-image",
            "--work",
            str(tmp_path / "work"),
            "--results",
            str(results),
            "--threads",
            "1",
        ]
    )
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["variant"] for r in lines] == ["base", "cell"] == [r["variant"] for r in rows]
    assert lines[1]["options"] == ["--mask-positions", "target", "--mask-cell-image"]
    for row in lines:
        assert row["n"] == 4 and 0 <= row["dice"] <= 1 and row["val_curve"][-1][0] == 3
        assert set(row["parts"]) == {"tokens", "refined", "dense"}
        assert f"--tokenizer {ref}" in row["command"]
    cfg = json.loads((tmp_path / "work" / "cell" / "config.json").read_text())
    assert cfg["model"]["mask_cell_image"] is True
    # the reference's tokenizer was reused, not refitted
    assert (tmp_path / "work" / "cell" / "mask_vq.safetensors").read_bytes() == (
        ref / "mask_vq.safetensors"
    ).read_bytes()


def test_trained_decode_on_the_shipped_model() -> None:
    """``bench_trained_decode.py``: speculative against plain greedy on the shipped model (noise
    images, as without --data): identical codes, the pass counts and ratios it prints."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_trained_decode
    finally:
        sys.path.remove(str(BENCH))
    out = bench_trained_decode.main(["--n", "2", "--batch", "2", "--repeats", "2", "--json"])
    assert out["model"] == "chest-xray" and out["cases"] == 2 and out["identical"] is True
    passes = out["passes_per_mask"]
    assert passes["plain"] == 63 and 0 < passes["speculative_batch1"] <= 63
    assert out["fewer_passes_batch1"] == pytest.approx(63 / passes["speculative_batch1"])
    assert len(out["speedup_batch1_per_turn"]) == 2 and out["speedup_batch1"] > 0
    assert 0 <= out["acceptance"] <= 1 and out["predict_ms"] > 0
    one = out["one_prefix_pass"]  # one pass over the prefix against the three it replaced
    assert one["max_prob_diff"] < 1e-5 and one["max_presence_diff"] < 1e-5
    assert len(one["speedup_batch1_per_turn"]) == 2 and one["speedup_batch2"] > 0


def test_volume_bench_predicts_a_synthetic_volume() -> None:
    """``bench_volume.py``: a small synthetic NIfTI volume end to end through predict with the
    model loaded once; the JSON names the slices, the time per volume and the peak memory."""
    proc = subprocess.run(
        [sys.executable, "bench_volume.py", "--model", "chest-xray", "--slices", "3",
         "--repeats", "1", "--warmup", "0", "--text", "left lung", "--json", "--threads", "1"],
        cwd=BENCH, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["slices"] == 3 and out["seconds_per_volume"]["median_s"] > 0
    assert out["peak_rss_mb"] > 0 and out["status"] in ("found", "not found")
    assert "3-slice volume in" in proc.stderr


def test_presence_gate_cost_reads_an_ungated_evaluation(tmp_path: Path) -> None:
    """bench/presence_gate_cost.py on a hand-made CSV: two present findings (one above the
    threshold, one below), two empty truths (one drawn by the decoder)."""
    rows = [
        "name,dice,iou,pred_pixels,gt_pixels,pred,gt,kind,presence",
        "a,0.8,0.7,100,120,,a.png,describe,0.95",
        "b,0.6,0.5,40,60,,b.png,describe,0.40",
        "c,0.0,0.0,30,0,,c.png,absent,0.70",
        "d,1.0,1.0,0,0,,d.png,absent,0.10",
    ]
    path = tmp_path / "val.csv"
    path.write_text("\n".join(rows) + "\n")
    r = subprocess.run([sys.executable, str(BENCH / "presence_gate_cost.py"), str(path),
                        "--threshold", "0.9"], capture_output=True, text=True, check=True)  # fmt: skip
    assert "found: 100.0% without the gate, 50.0% at 0.900" in r.stdout
    assert "empty truths drawn: 1 without the gate, 0 at the threshold" in r.stdout
    assert "describe (2): 0.700 without the gate, 0.400 with it" in r.stdout
    assert "the gate empties (1): area min/median/max 40 / 40 / 40 px" in r.stdout
    path.write_text("name,dice,iou,pred_pixels,gt_pixels,pred,gt,kind,presence\na,1,1,0,0,,a,,\n")
    bad = subprocess.run([sys.executable, str(BENCH / "presence_gate_cost.py"), str(path),
                          "--threshold", "0.5"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "no presence column" in bad.stderr

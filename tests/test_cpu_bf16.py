"""bf16 training on a CPU (``mriseg train --cpu-bf16``): when it applies, what it computes in
which precision, and that the option reaches the run folder and may change on a resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.models.transformer import Transformer, TransformerConfig, float32_attention
from mrisegcli.training import loop
from mrisegcli.training.loop import TrainConfig, autocast_bf16, train

runner = CliRunner()
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_autocast_applies_on_cuda_by_default_and_on_a_cpu_only_when_asked_and_native(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert autocast_bf16(TrainConfig(), CUDA) and not autocast_bf16(TrainConfig(amp=False), CUDA)
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert not autocast_bf16(TrainConfig(), CPU)  # off unless asked
    assert autocast_bf16(TrainConfig(cpu_bf16=True), CPU)
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mrisegcli.training.loop"):
        assert not autocast_bf16(TrainConfig(cpu_bf16=True), CPU)  # emulated bf16 is slower
    assert "no native bf16" in caplog.text


def test_native_bf16_check_reads_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    expect = any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))
    assert loop.cpu_has_native_bf16() is expect


class Toy(torch.nn.Module):
    """Records the dtype its linear layer computes in."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)
        self.dtypes: set[torch.dtype] = set()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.lin(batch["x"]).squeeze(-1)
        self.dtypes.add(pred.dtype)
        loss = F.mse_loss(pred.float(), batch["y"])
        return {"loss": loss}


def test_training_step_computes_in_bf16_and_keeps_float32_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    data = {"x": x, "y": x @ torch.linspace(-1, 1, 8)}
    cfg = TrainConfig(steps=60, batch_size=16, lr=5e-2, warmup_steps=2, cpu_bf16=True)
    for bf16 in (True, False):
        torch.manual_seed(0)
        model = Toy()
        before = F.mse_loss(model.lin(x).squeeze(-1), data["y"]).item()
        summary = train(
            model,
            data,
            cfg if bf16 else TrainConfig(**{**cfg.__dict__, "cpu_bf16": False}),
            tmp_path / str(bf16),
            device=CPU,
        )
        after = F.mse_loss(model.lin(x).squeeze(-1), data["y"]).item()
        assert summary["precision"] == ("bf16" if bf16 else "fp32")
        assert model.dtypes == {torch.bfloat16 if bf16 else torch.float32}
        assert model.lin.weight.dtype == torch.float32  # autocast: float32 master weights
        assert after < 0.2 * before  # it learns in bf16 too


def test_float32_attention_is_the_attention_of_the_bf16_inputs_with_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    bias = torch.zeros(10, 10).masked_fill(~mask, float("-inf")).bfloat16()
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    for m in (mask, bias, None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = float32_attention(q, k, v, m, 0.0)
        assert y.dtype == torch.bfloat16
        if m is not None:
            torch.testing.assert_close(y.float(), want, atol=1e-2, rtol=1e-2)
    y.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_transformer_under_cpu_autocast_agrees_with_float32_with_and_without_grad() -> None:
    torch.manual_seed(0)
    tf = Transformer(TransformerConfig(dim=32, n_layers=2, n_heads=4, mlp_hidden=64)).eval()
    x = torch.randn(2, 12, 32)
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    pos = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1)
    pos = pos.reshape(12, 2)
    ref = tf(x, pos, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            plain = tf(x, pos, mask)  # PyTorch's bf16 attention kernel
        graded = tf(x, pos, mask)  # the float32 attention of float32_attention
    for y in (plain, graded):
        torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
    torch.testing.assert_close(graded.float(), plain.float(), atol=0.05, rtol=0.05)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    r = runner.invoke(
        app,
        ["synth", str(root), "--n-train", "16", "--n-val", "4", "--n-test", "4", "--size", "32"],
    )
    assert r.exit_code == 0, r.output
    return root


def test_cli_option_reaches_the_run_and_may_change_on_a_resume(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    run = tmp_path / "run"
    common = ["--data", str(synth_data), "--out", str(run), "--size", "32", "--device", "cpu"]
    fit = ["--batch-size", "8", "--mask-steps", "30", "--eval-every", "2", "--workers", "0"]
    r = runner.invoke(app, ["train", *common, *fit, "--steps", "2", "--cpu-bf16", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert json.loads(r.stdout.strip().splitlines()[-1])["precision"] == "bf16"
    assert json.loads((run / "config.json").read_text())["run"]["train"]["cpu_bf16"] is True
    assert json.loads((run / "metrics.json").read_text())["precision"] == "bf16"
    r = runner.invoke(
        app, ["train", *common, "--resume", "--steps", "4", "--no-cpu-bf16", "--json"]
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert json.loads(r.stdout.strip().splitlines()[-1])["precision"] == "fp32"
    assert json.loads((run / "config.json").read_text())["run"]["train"]["cpu_bf16"] is False


@pytest.mark.parametrize("native", [True, False])
def test_default_is_bf16_exactly_where_the_cpu_computes_it_natively(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    run = tmp_path / "run"
    r = runner.invoke(
        app,
        ["train", "--data", str(synth_data), "--out", str(run), "--size", "32", "--device", "cpu",
         "--batch-size", "8", "--mask-steps", "30", "--workers", "0", "--steps", "1", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, (r.output, r.exception)
    assert json.loads(r.stdout.strip().splitlines()[-1])["precision"] == (
        "bf16" if native else "fp32"
    )
    assert json.loads((run / "config.json").read_text())["run"]["train"]["cpu_bf16"] is native

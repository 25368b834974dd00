"""The cold start of one prediction (``bench/bench_cold_start.py`` times it): what a fresh
process imports (for a PNG neither the DICOM nor the NIfTI reader), that a model and its mask
tokenizer are built once without initialising weights that are then thrown away, and that they
equal ones built and loaded the old way (random initialisation, then the weights copied in);
the run's text tokenizer read without transformers gives what transformers gives."""

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from mrisegcli.config import run_preset, with_image_size
from mrisegcli.errors import MrisegError
from mrisegcli.runinfo import read_config
from mrisegcli.shipped import DEFAULT_MODEL, ENV_VAR, shipped_model
from mrisegcli.tokenizers.text import (
    TextTokenizer,
    load_text_tokenizer,
    pad_id,
    read_text_tokenizer,
    save_text_tokenizer,
    text_vocab_size,
    token_ids,
    train_text_tokenizer,
)
from mrisegcli.workflow import segmenter
from mrisegcli.workflow.bundle import TokenizerBundle, load_bundle

CHEST = shipped_model(DEFAULT_MODEL)
needs_chest = pytest.mark.skipif(CHEST is None, reason="the shipped chest model is not installed")
#: what a cold `mriseg predict` of a PNG radiograph used to import and needs not
AVOIDED = ("transformers", "sympy", "torch._dynamo", "pydicom", "nibabel", "highdicom")
#: aten ops that fill a tensor with random or constant values (weight initialisation)
INIT_OPS = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "erfinv_"}
TEXTS = [
    "left lung",
    "Right  LUNG!!",
    "",
    "   ",
    "héllo wörld ﬁ",
    "[PAD] x [CLS]",
    "cardiac silhouette, heart",
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "zzqx unseenword 123",
    "soft\u00adhyphen zero\u200bwidth tab\tnewline\n",
]


def _modules_after(code: str, tmp_path) -> list[str]:
    """The module names a fresh interpreter holds after ``code`` (its last stdout line)."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    tail = "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code + tail],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy(modules: list[str], roots: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == r or m.startswith(r + ".") for r in roots)]


def test_version_and_the_cli_module_import_neither_torch_nor_transformers(tmp_path):
    code = (
        "import sys\n"
        "sys.argv = ['mriseg', '--version']\n"
        "from mrisegcli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
    )
    modules = _modules_after(code, tmp_path)
    assert "mrisegcli.cli" in modules
    assert _heavy(modules, ("torch", "transformers", "safetensors", "tokenizers")) == []


@needs_chest
def test_predict_of_a_png_imports_no_transformers_torch_compiler_dicom_or_nifti(tmp_path):
    png = tmp_path / "chest.png"
    Image.fromarray((np.random.default_rng(0).random((96, 80)) * 255).astype(np.uint8)).save(png)
    code = (
        "import sys\n"
        f"sys.argv = ['mriseg', 'predict', {str(png)!r}, '--text', 'left lung', '--quiet',\n"
        f"            '--out', {str(tmp_path / 'out')!r}]\n"
        "from mrisegcli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
    )
    modules = _modules_after(code, tmp_path)
    assert (tmp_path / "out" / "chest_mask.png").is_file()
    assert "torch" in modules and "mrisegcli.workflow.segmenter" in modules
    assert _heavy(modules, AVOIDED) == []


class _RecordOps(TorchDispatchMode):
    """Counts the aten ops that run (meta tensors included) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _assert_same_tensors(old: torch.nn.Module, new: torch.nn.Module) -> None:
    a, b = _tensors(old), _tensors(new)
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert not y.is_meta, name
        assert (x.dtype, x.shape, x.requires_grad) == (y.dtype, y.shape, y.requires_grad), name
        assert type(x) is type(y), name
        assert torch.equal(x, y), name


@needs_chest
def test_loading_builds_the_model_once_and_initialises_no_weight(monkeypatch):
    builds = []
    real_build = segmenter.build_model

    def counting_build(*args, **kwargs):
        builds.append(args[0])
        return real_build(*args, **kwargs)

    monkeypatch.setattr(segmenter, "build_model", counting_build)
    seg = segmenter.load_segmenter(CHEST.path, torch.device("cpu"))
    assert builds == [seg.paradigm]  # no second model to check the weights' shapes with
    assert not any(t.is_meta for t in _tensors(seg.model).values())

    raw = read_config(CHEST.path)
    mcfg = segmenter.model_config_from_dict(raw["paradigm"], raw["model"])
    with _RecordOps() as rec:
        model = segmenter.build_empty_model(raw["paradigm"], mcfg, seg.bundle)
        segmenter.load_weights(model, CHEST.path / segmenter.MODEL_FILE)
    assert INIT_OPS.isdisjoint(rec.ops), rec.ops
    assert "copy_" not in rec.ops  # the file's tensors take the place of the meta ones
    _assert_same_tensors(seg.model, model)


@needs_chest
def test_shipped_model_loads_as_the_old_path_did_and_predicts_the_same():
    seg = segmenter.load_segmenter(CHEST.path, torch.device("cpu"))
    raw = read_config(CHEST.path)
    mcfg = segmenter.model_config_from_dict(raw["paradigm"], raw["model"])
    old = segmenter.build_model(raw["paradigm"], mcfg, seg.bundle)  # random init, then copied
    old.load_state_dict(load_file(str(CHEST.path / segmenter.MODEL_FILE)), strict=False)
    old.eval()
    _assert_same_tensors(old, seg.model)

    twin = segmenter.Segmenter(seg.paradigm, old, seg.bundle, seg.cfg, torch.device("cpu"))
    twin.presence_head, twin.presence_threshold = seg.presence_head, seg.presence_threshold
    images = np.random.default_rng(1).random((2, seg.image_size, seg.image_size), np.float32)
    a, b = twin.predict(images, "left lung"), seg.predict(images, "left lung")
    assert torch.equal(a.prob, b.prob) and torch.equal(a.presence, b.presence)


@pytest.mark.parametrize("kind", ["mask_vq", "image_vq", "multiscale"])
def test_tokenizer_loads_without_initialising_and_equals_the_saved_one(kind, tmp_path):
    from mrisegcli.tokenizers.serialize import KINDS, load_tokenizer, save_tokenizer

    cls, cfg_cls = KINDS[kind]
    torch.manual_seed(0)
    saved = cls(cfg_cls()).eval()
    path = save_tokenizer(saved, tmp_path / f"{kind}.safetensors")
    with _RecordOps() as rec:
        loaded = load_tokenizer(path)
    assert INIT_OPS.isdisjoint(rec.ops), rec.ops
    assert "copy_" not in rec.ops  # the file's tensors take the place of the meta ones
    _assert_same_tensors(saved, loaded)  # the unsaved codebook bookkeeping too: zeros
    assert not loaded.training


def test_presence_head_with_a_non_finite_weight_is_refused(tmp_path):
    from mrisegcli.presence import PresenceHead, load_presence, save_presence

    section = {"in_dim": 12, "hidden": 8, "threshold": 0.5}
    head = PresenceHead(12, 8).eval()
    save_presence(head, tmp_path)
    loaded = load_presence(tmp_path, section, torch.device("cpu"))
    _assert_same_tensors(head, loaded)
    with torch.no_grad():
        head.mlp[0].weight[3, 4] = float("inf")
    save_presence(head, tmp_path)
    with pytest.raises(MrisegError, match="presence head holds NaN or infinite weights"):
        load_presence(tmp_path, section, torch.device("cpu"))


def _random_bundle(cfg) -> TokenizerBundle:
    """Untrained tokenizers of the paradigm of ``cfg`` (sizes only matter here)."""
    from mrisegcli.tokenizers.image_vq import ImageVQ
    from mrisegcli.tokenizers.mask_vq import MaskVQ
    from mrisegcli.tokenizers.multiscale import MultiScaleMaskQuantizer
    from mrisegcli.workflow.bundle import needed_tokenizers

    need = needed_tokenizers(cfg.paradigm, cfg.strategies.image_input)
    make = {"mask_vq": (MaskVQ, cfg.mask_vq), "image_vq": (ImageVQ, cfg.image_vq)}
    make["multiscale"] = (MultiScaleMaskQuantizer, cfg.multiscale)
    parts = {name: make[name][0](make[name][1]).eval() for name in need}
    return TokenizerBundle(text=train_text_tokenizer(TEXTS, vocab_size=120), **parts)


@pytest.mark.parametrize(
    "preset, paradigm, size",
    [("tiny", "next-token", 32), ("tiny", "next-scale", 32), ("cxr", "next-token", 128)],
)
def test_empty_model_loaded_equals_a_built_one(preset, paradigm, size, tmp_path, one_thread):
    cfg = replace(with_image_size(run_preset(preset), size), paradigm=paradigm)
    bundle = _random_bundle(cfg)
    mcfg = segmenter.model_config(cfg, bundle)
    torch.manual_seed(0)
    built = segmenter.build_model(paradigm, mcfg, bundle).eval()
    path = tmp_path / "model.safetensors"
    stored = {k: v.contiguous() for k, v in built.state_dict().items()}
    save_file({k: v for k, v in stored.items() if not k.startswith("het_memory")}, str(path))

    with _RecordOps() as rec:
        loaded = segmenter.build_empty_model(paradigm, mcfg, bundle)
        segmenter.load_weights(loaded, path)
    assert INIT_OPS.isdisjoint(rec.ops), rec.ops
    _assert_same_tensors(built, loaded.eval())


def test_non_finite_weights_are_still_refused_naming_the_tensor(tmp_path):
    model = torch.nn.Linear(3, 2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["weight"][1, 2] = float("nan")
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    empty = torch.nn.Linear(3, 2, device="meta")
    with pytest.raises(MrisegError, match=r"NaN or infinite values \(1 of 6 in tensor weight\)"):
        segmenter.load_weights(empty, path)


# ---------------------------------------------------------------------------- text tokenizer


@needs_chest
def test_run_text_tokenizer_read_without_transformers_answers_as_transformers_does(tmp_path):
    light, full = read_text_tokenizer(CHEST.path), load_text_tokenizer(CHEST.path)
    assert isinstance(light, TextTokenizer)
    assert token_ids(light, TEXTS) == token_ids(full, TEXTS)
    assert pad_id(light) == pad_id(full) and light.eos_token_id == full.eos_token_id
    assert text_vocab_size(light) == text_vocab_size(full) == len(light)
    assert light.get_vocab() == full.get_vocab()
    norm_a = light.backend_tokenizer.normalizer.normalize_str
    norm_b = full.backend_tokenizer.normalizer.normalize_str
    assert [norm_a(t) for t in TEXTS] == [norm_b(t) for t in TEXTS]
    # anything else is transformers' own answer
    ids = token_ids(light, ["left lung"])[0]
    assert light.convert_ids_to_tokens(ids) == full.convert_ids_to_tokens(ids)
    assert light(["left lung"])["input_ids"] == full(["left lung"])["input_ids"]
    save_text_tokenizer(light, tmp_path / "a")
    save_text_tokenizer(full, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (
        load_bundle(CHEST.path).text.backend_tokenizer.to_str() == full.backend_tokenizer.to_str()
    )


def test_a_tokenizer_config_with_other_settings_is_read_by_transformers(tmp_path):
    tok = train_text_tokenizer(TEXTS, vocab_size=120)
    save_text_tokenizer(tok, tmp_path)
    assert isinstance(read_text_tokenizer(tmp_path), TextTokenizer)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "do_lower_case": False}))
    assert not isinstance(read_text_tokenizer(tmp_path), TextTokenizer)
    config_file.write_text(json.dumps({**config, "pad_token": "[NOT-A-TOKEN]"}))
    assert not isinstance(read_text_tokenizer(tmp_path), TextTokenizer)
    config_file.unlink()  # no config: the tokenizer.json alone, through transformers
    assert token_ids(read_text_tokenizer(tmp_path), TEXTS) == token_ids(tok, TEXTS)

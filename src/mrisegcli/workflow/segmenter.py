"""Models of both paradigms behind one inference interface.

``build_model`` makes the transformer a run config asks for, sized by its tokenizers;
:class:`Segmenter` turns images and a text into mask probabilities (and, with several samples,
an uncertainty map) whatever the paradigm; ``load_segmenter`` rebuilds one from a run folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrisegcli import runfolder
from mrisegcli.config import RunConfig, from_dict, to_dict
from mrisegcli.errors import ConfigError, MrisegError
from mrisegcli.paradigms import DecodeOptions, get_paradigm
from mrisegcli.workflow.bundle import TokenizerBundle

MODEL_FILE = runfolder.MODEL


def model_config(cfg: RunConfig, bundle: TokenizerBundle, n_train: int = 4096) -> Any:
    """The model config of a run: the preset's transformer, sized by the tokenizers."""
    return get_paradigm(cfg.paradigm).model_config(cfg, bundle, n_train)


def build_model(paradigm: str, mcfg: Any, bundle: TokenizerBundle) -> torch.nn.Module:
    return get_paradigm(paradigm).build(mcfg, bundle)


def model_config_from_dict(paradigm: str, d: dict) -> Any:
    return get_paradigm(paradigm).config_from_dict(d)


def training_tensors(paradigm: str, codes: Any, mcfg: Any) -> dict[str, torch.Tensor]:
    """Cached codes of a split (``LoadedCodes.fields``) -> the batch dict the model trains on."""
    return get_paradigm(paradigm).training_tensors(codes, mcfg)


@dataclass
class Prediction:
    prob: torch.Tensor  # (B, S, S) float32 mean foreground probability
    uncertainty: torch.Tensor | None = None  # (B, S, S) in [0, 1] when samples > 1
    steps: list[torch.Tensor] | None = None  # next-scale: (B, S, S) probability after each scale
    # predict(parts=True), next-token: (B, S, S) probability of each way to draw the mask from
    # the same decoded codes: "tokens" (the mask tokenizer's decoder), "refined" (the
    # full-resolution refiner) and "dense" (the dense head, which never reads the codes)
    parts: dict[str, torch.Tensor] | None = None
    # (B,) calibrated probability that the prompt's target is in the image (presence.py); None
    # for a model without a presence head
    presence: torch.Tensor | None = None


class Segmenter:
    """Inference for one loaded model + tokenizers; batches of (B, S, S) images in [0, 1]."""

    def __init__(
        self,
        paradigm: str,
        model: torch.nn.Module,
        bundle: TokenizerBundle,
        cfg: RunConfig,
        device: torch.device,
        *,
        batch_size: int = 32,
        compile: bool = False,
        speculative: bool = True,
    ) -> None:
        self.paradigm, self.model, self.bundle, self.cfg = paradigm, model.eval(), bundle, cfg
        self.impl = get_paradigm(paradigm)
        self._decode_cache: dict[str, Any] = {}  # the paradigm's reusable decoding state
        # greedy next-token decoding drafted by the model's own NkTP heads (same codes, fewer passes)
        self.speculative = speculative
        self.device, self.batch_size, self.compile = device, batch_size, compile
        self.image_size = cfg.image_size
        #: called with a one-line message when a prompt is cut to the text context
        self.warn: Any = None
        # each prompt's (L,) token ids and mask on the CPU, tokenised once (encode_text)
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.amp_dtype = torch.bfloat16 if device.type == "cuda" else None
        #: the presence head (presence.py) and its threshold: below it a mask is empty
        self.presence_head: torch.nn.Module | None = None
        self.presence_threshold: float | None = None
        #: what the model answers (scope.py): its targets and vocabulary; None when unknown
        self.scope: dict[str, Any] | None = None
        #: a volume's mask keeps only components of at least this share of its largest
        #: (postprocess.py; 0: every component)
        self.min_component_share = 0.0

    @classmethod
    def load(
        cls, model: str | Path | None = None, *, device: str | torch.device = "cpu", **kw: Any
    ) -> Segmenter:
        """A model ready to segment: a run folder, a Hub id ``user/repo[@revision]``, a shipped
        model's name, or ``None`` for ``$MRISEG_MODEL`` else the shipped chest-radiograph model."""
        from mrisegcli.hub import resolve_run
        from mrisegcli.shipped import choose_model

        spec = choose_model(None if model is None else str(model)).spec
        return load_segmenter(resolve_run(spec), torch.device(device), **kw)

    def segment(
        self, images: Any, texts: str | list[str], *, threshold: float = 0.5
    ) -> list[np.ndarray]:
        """Boolean masks, one per input at the input's own size (a list, also for one input):
        ``images`` is one image or a list of them, each a 2-D array of any size and intensity
        range or the path of a 2-D image (PNG/JPEG/DICOM/NIfTI slice); ``texts`` one prompt
        for all or one per image. Other arguments are refused saying what is expected
        (:mod:`mrisegcli.workflow.segment_args`)."""
        from mrisegcli.io.intensity import resize_prob, to_model_input
        from mrisegcli.io.read import read_scan
        from mrisegcli.workflow.segment_args import images_and_texts

        images, texts = images_and_texts(images, texts)
        arrays, windows = [], []
        for im in images:
            if isinstance(im, Path):
                scan = read_scan(Path(im))
                pixels = (
                    scan.pixels[0]
                    if scan.pixels.ndim == 3 and scan.pixels.shape[0] == 1
                    else scan.pixels
                )
                if pixels.ndim != 2:
                    raise MrisegError(
                        "is not a 2-D image (use mriseg predict for volumes)", Path(im)
                    )
                arrays.append(pixels)
                windows.append(scan.meta.get("window"))
            else:
                arrays.append(np.asarray(im))
                windows.append(None)
        model_in = np.stack(
            [
                to_model_input(a, self.image_size, window=w)
                for a, w in zip(arrays, windows, strict=True)
            ]
        )
        pred = self.predict(model_in, texts)
        prob = pred.prob.numpy()
        there = self.is_present(pred.presence, len(prob))
        return [
            (resize_prob(p, a.shape[-2:]) > threshold) & bool(ok)
            for p, a, ok in zip(prob, arrays, there, strict=True)
        ]

    def normalize(self, text: str) -> str:
        """``text`` as the model reads it: its text tokenizer's normaliser (synonym folding)."""
        return self.bundle.text.backend_tokenizer.normalizer.normalize_str(text)

    def refusal(self, text: str) -> str | None:
        """Why ``text`` is outside what the model answers (scope.py), or ``None``; always
        ``None`` for a model that records no scope."""
        from mrisegcli.scope import refusal

        return refusal(text, self.scope, self.normalize) if self.scope else None

    def is_present(
        self, presence: torch.Tensor | None, n: int, threshold: float | None = None
    ) -> np.ndarray:
        """(n,) bool: the presence score is at or above ``threshold`` (default the model's own;
        all True without a presence head)."""
        threshold = self.presence_threshold if threshold is None else threshold
        if presence is None or threshold is None:
            return np.ones(n, bool)
        return presence.cpu().numpy() >= threshold

    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids and mask of the prompts on the device, L the model's text context.
        Each prompt is tokenised once for the life of the Segmenter (a batch of inputs with one
        prompt tokenises it once); a prompt longer than the text context is cut to it, and
        :attr:`warn` (when set) is told so once, naming the count."""
        from mrisegcli.tokenizers.text import pad_token_rows, token_ids

        n = self.cfg.text_len
        new = [t for t in dict.fromkeys(texts) if t not in self._tokens]
        if new:
            rows = token_ids(self.bundle.text, new)
            for text, row in zip(new, rows, strict=True):
                if len(row) > n and self.warn is not None:
                    self.warn(
                        f"the prompt has {len(row)} tokens; the model reads the first {n} "
                        f"and {len(row) - n} token(s) are dropped: {text[:60]!r}"
                    )
            ids, mask = pad_token_rows(self.bundle.text, rows, n)
            self._tokens.update(zip(new, zip(ids, mask, strict=True), strict=True))
        if not texts:
            return (
                torch.zeros(0, n, dtype=torch.int64, device=self.device),
                torch.zeros(0, n, dtype=torch.bool, device=self.device),
            )
        ids = torch.stack([self._tokens[t][0] for t in texts])
        mask = torch.stack([self._tokens[t][1] for t in texts])
        return ids.to(self.device), mask.to(self.device)

    def set_text_tokenizer(self, tok: Any) -> None:
        """Read prompts with ``tok`` from now on (the prompts tokenised so far are forgotten)."""
        self.bundle.text = tok
        self._tokens.clear()

    def hide_text(self, text_mask: torch.Tensor) -> torch.Tensor:
        """The text mask the model is given: all padding for an image-only model."""
        return text_mask if self.cfg.use_text else torch.zeros_like(text_mask)

    def image_input(self, image_B1SS: torch.Tensor) -> torch.Tensor:
        """What the model reads of (B, 1, S, S) images on the device: the pixels, or the
        image tokenizer's codes of them (the paradigm decides)."""
        return self.impl.model_input(self.model, self.bundle, image_B1SS)

    @torch.no_grad()
    def predict_tensors(
        self,
        image_B1SS: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        samples: int = 1,
        temperature: float | None = None,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        steps: bool = False,
        parts: bool = False,
    ) -> Prediction:
        """One batch already on the device. ``samples`` > 1 draws that many masks per image
        (temperature defaults to 1 then, 0 = greedy otherwise) and fuses them by consensus.
        A next-token model with a refiner returns the refined mask; ``parts`` adds every way
        of drawing it (:attr:`Prediction.parts`)."""
        from mrisegcli.decode.consensus import consensus

        temp = (1.0 if samples > 1 else 0.0) if temperature is None else temperature
        B = image_B1SS.shape[0]
        opts = DecodeOptions(
            samples=samples,
            temperature=temp,
            top_k=top_k,
            generator=generator,
            steps=steps,
            parts=parts,
            speculative=self.speculative,
            compile=self.compile,
            amp_dtype=self.amp_dtype,
            presence=self.presence_head is not None,
        )
        out = self.impl.decode(
            self.model,
            self.bundle,
            image_B1SS,
            text_ids,
            self.hide_text(text_mask),
            opts,
            self._decode_cache,
        )

        def mean_prob(logits: torch.Tensor) -> torch.Tensor:  # (B * samples, 1, S, S) -> (B, S, S)
            return torch.sigmoid(logits.float()).view(B, samples, *logits.shape[-2:]).mean(1)

        step_probs = [mean_prob(s) for s in out.steps] if out.steps is not None else None
        part_probs = {k: mean_prob(v) for k, v in out.parts.items()} if out.parts else None
        if out.presence_states is not None:  # read from the decoder's own pass over the prefix
            presence = self._presence_probs(out.presence_states)
        else:
            presence = self.presence_tensors(image_B1SS, text_ids, text_mask)
        if samples == 1:
            return Prediction(mean_prob(out.logits), None, step_probs, part_probs, presence)
        fused = consensus(
            torch.sigmoid(out.logits.float()).view(B, samples, *out.logits.shape[-2:])
        )
        return Prediction(fused.mean_prob, fused.uncertainty, step_probs, part_probs, presence)

    @torch.no_grad()
    def presence_tensors(
        self, image_B1SS: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """(B,) calibrated presence probabilities of one batch on the device; ``None`` without
        a presence head."""
        if self.presence_head is None:
            return None
        x = self.image_input(image_B1SS)
        return self._presence_probs(
            self.impl.presence_states(self.model, x, text_ids, self.hide_text(text_mask))
        )

    def _presence_probs(self, states: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """The paradigm's presence states (image-token states, mask-start state) -> (B,)
        calibrated presence probabilities (``presence.py``)."""
        if self.presence_head is None:
            return None
        from mrisegcli.presence import features_of_states

        return torch.sigmoid(self.presence_head(features_of_states(*states))).float()

    def predict(
        self,
        images_NSS: np.ndarray,
        texts: str | Sequence[str],
        *,
        samples: int = 1,
        temperature: float | None = None,
        seed: int | None = None,
        steps: bool = False,
        parts: bool = False,
        progress: Callable[[int, int], Any] | None = None,
    ) -> Prediction:
        """Numpy images (N, S, S) in [0, 1] with one text each (or one text for all) -> CPU
        probabilities: the one batching loop of inference (``mriseg predict``, ``evaluate``,
        :meth:`segment`). Batches of ``batch_size // samples`` images go to
        :meth:`predict_tensors`; with a ``seed`` the sampling starts from it; ``progress(done,
        total)`` is called after each batch."""
        if isinstance(texts, str):
            texts = [texts] * len(images_NSS)
        if len(texts) != len(images_NSS):
            raise ValueError("one text per image")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        probs, uncs, step_lists, part_lists, presences = [], [], [], [], []
        per = max(1, self.batch_size // max(1, samples))
        all_ids, all_tmask = self.encode_text(texts)  # each prompt tokenised once
        for start in range(0, len(images_NSS), per):
            img = torch.from_numpy(
                np.ascontiguousarray(images_NSS[start : start + per], np.float32)
            )
            ids, tmask = all_ids[start : start + per], all_tmask[start : start + per]
            p = self.predict_tensors(
                img[:, None].to(self.device),
                ids,
                tmask,
                samples=samples,
                temperature=temperature,
                generator=generator,
                steps=steps,
                parts=parts,
            )
            probs.append(p.prob.cpu())
            if p.presence is not None:
                presences.append(p.presence.cpu())
            if p.parts is not None:
                part_lists.append({k: v.cpu() for k, v in p.parts.items()})
            if p.uncertainty is not None:
                uncs.append(p.uncertainty.cpu())
            if p.steps is not None:
                step_lists.append([s.cpu() for s in p.steps])
            if progress is not None:
                progress(min(start + per, len(images_NSS)), len(images_NSS))
        steps_out = (
            [torch.cat(parts) for parts in zip(*step_lists, strict=True)] if step_lists else None
        )
        parts_out = (
            {k: torch.cat([d[k] for d in part_lists]) for k in part_lists[0]}
            if part_lists
            else None
        )
        return Prediction(
            torch.cat(probs),
            torch.cat(uncs) if uncs else None,
            steps_out,
            parts_out,
            torch.cat(presences) if presences else None,
        )


def save_model(
    model: torch.nn.Module, run_dir: Path, keep: Callable[[str], bool] | None = None
) -> Path:
    """``model.safetensors`` of a run (weights only; the config lives in config.json, which
    records the file's fingerprint: :func:`mrisegcli.weights.save_weights`); ``keep`` chooses
    the tensors by name (default: all)."""
    from mrisegcli.weights import save_weights

    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if keep is None or keep(k)
    }
    return save_weights(tensors, Path(run_dir))


#: Largest sizes a model config may ask for, checked before anything is built: a damaged or
#: hostile config.json must not make mriseg allocate without bound. Generous for real models
#: (the presets are far below) and checked again against the weights' own header.
SIZE_LIMITS = {
    "dim": 16384,
    "n_layers": 512,
    "n_heads": 1024,
    "mlp_hidden": 65536,
    "max_seq_len": 16384,
    "image_codebook_size": 1 << 20,
    "mask_codebook_size": 1 << 20,
    "text_vocab_size": 1 << 21,
    "image_grid": 512,
    "mask_grid": 512,
    "text_len": 8192,
    "image_size": 8192,
    "code_dim": 16384,
    "patch": 4096,
    "channels": 16384,
    "res_blocks": 256,
    "stage_blocks": 256,
    "out_dim": 16384,
    "nktp_k": 256,
    "tcl_proj_dim": 16384,
    "het_buckets": 10_000_000,
    "scales": 512,
}
MAX_LIST = 256  # entries of a list setting (encoder channels, scales)
#: memory a model may need beyond its weights file (buffers not stored in it: the hard-token
#: memory a shipped model leaves out, attention masks)
MAX_UNSTORED_BYTES = 1 << 30


def check_config_sizes(section: Any, where: str, path: Path) -> None:
    """Refuse any size in a config section above :data:`SIZE_LIMITS`, naming the setting."""
    if isinstance(section, dict):
        for key, value in section.items():
            name = f"{where}.{key}"
            limit = SIZE_LIMITS.get(key)
            if isinstance(value, list):
                if len(value) > MAX_LIST:
                    raise ConfigError(
                        f"{name} has {len(value)} entries, above the limit {MAX_LIST} "
                        "(a damaged config.json?)",
                        path,
                    )
                if limit is not None:
                    for v in value:
                        if isinstance(v, int) and not isinstance(v, bool) and v > limit:
                            raise ConfigError(
                                f"{name} holds {v}, above the limit {limit} "
                                "(a damaged config.json?)",
                                path,
                            )
            elif isinstance(value, dict):
                check_config_sizes(value, name, path)
            elif (
                limit is not None
                and isinstance(value, int)
                and not isinstance(value, bool)
                and value > limit
            ):
                raise ConfigError(
                    f"{name} is {value}, above the limit {limit} (a damaged config.json?)", path
                )


def build_empty_model(paradigm: str, mcfg: Any, bundle: TokenizerBundle) -> torch.nn.Module:
    """The model of ``mcfg`` with its parameters and state buffers on the meta device (no
    memory, no initialisation): the shapes to check a weights file against, and the modules
    that :func:`load_weights` fills with the file's tensors."""
    from mrisegcli.tokenizers.serialize import shapes_only

    with shapes_only():
        return build_model(paradigm, mcfg, bundle)


def _check_weights_fit(
    meta: torch.nn.Module, header: dict[str, tuple[int, ...]], path: Path
) -> None:
    """Compare every tensor the model built by :func:`build_empty_model` expects with the
    weights file's header: the first mismatch is one error naming the tensor."""
    state = meta.state_dict()
    unstored = 0
    for name, t in state.items():
        if name not in header:
            if name.startswith("het_memory"):  # training-only: a shipped model leaves it out
                unstored += t.numel() * t.element_size()
                continue
            raise ConfigError(
                f"weights do not match config.json: the model needs tensor {name} "
                f"{tuple(t.shape)}, the file has none",
                path,
            )
        if tuple(t.shape) != header[name]:
            raise ConfigError(
                f"weights do not match config.json: tensor {name} has shape "
                f"{header[name]} in the file, the config makes {tuple(t.shape)}",
                path,
            )
    for name in header:
        if name not in state:
            raise ConfigError(
                f"weights do not match config.json: the file has tensor {name}, "
                "which the model of this config does not have",
                path,
            )
    persistent = set(state)
    unstored += sum(
        b.numel() * b.element_size() for n, b in meta.named_buffers() if n not in persistent
    )
    if unstored > MAX_UNSTORED_BYTES:
        raise ConfigError(
            f"config.json asks for {unstored / 2**30:.1f} GiB of buffers beyond the weights "
            f"(the limit is {MAX_UNSTORED_BYTES >> 30} GiB; a damaged config.json?)",
            path,
        )


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    """Whether no floating-point tensor holds NaN or Inf (numpy's one pass over the float32
    file is many times faster than torch's per-tensor kernels on a small CPU)."""
    for t in state.values():
        if t.dtype in (torch.float32, torch.float64, torch.float16):
            if not np.isfinite(t.numpy()).all():
                return False
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return False
    return True


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Read a weights file into ``model`` from :func:`build_empty_model`, its tensors taking
    the place of the meta ones (no copy, no random init thrown away), each in the dtype the
    model declares; what the file leaves out (the training-only hard-token memory, state
    buffers made empty) is zeros. Damaged or non-finite weights are refused naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mrisegcli.tokenizers.serialize import assign_weights
    from mrisegcli.weights import check_finite

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise MrisegError(f"corrupt or truncated weights ({e})", path) from e
    if not _all_finite(state):
        check_finite(state, path)  # names the tensor and the count
    assign_weights(model, state)


def load_segmenter(
    run_dir: Path,
    device: torch.device,
    *,
    batch_size: int = 32,
    compile: bool = False,
    speculative: bool = True,
) -> Segmenter:
    """Rebuild tokenizers, model and config of a run folder (weights from safetensors only).

    Nothing is built from ``config.json`` until it is known to fit: sizes are bounded, the
    tokenizer files are checked against the fingerprints the run recorded, and the model the
    config describes is compared, tensor by tensor, with the weights file's header.
    """
    from mrisegcli.runinfo import read_config
    from mrisegcli.weights import CONFIG_KEY as WEIGHTS_KEY
    from mrisegcli.weights import verify_weights, weights_header
    from mrisegcli.workflow.bundle import load_bundle, needed_tokenizers, verify_files

    run_dir = Path(run_dir)
    config_path = run_dir / runfolder.CONFIG
    raw = read_config(run_dir)
    for key in ("run", "model"):
        if not isinstance(raw.get(key), dict):
            raise ConfigError(f"config.json has no '{key}' section", config_path)
        check_config_sizes(raw[key], f"config.{key}", config_path)
    cfg = from_dict(RunConfig, raw["run"], "config.run")
    paradigm = raw["paradigm"]
    mcfg = model_config_from_dict(paradigm, raw["model"])
    path = run_dir / MODEL_FILE
    if not path.is_file():
        raise MrisegError(f"run has no {MODEL_FILE} (training not finished?)", run_dir)
    header = weights_header(path)
    verify_weights(path, raw.get(WEIGHTS_KEY), config_path)  # damaged or from another run?
    bundle = load_bundle(run_dir, need=needed_tokenizers(paradigm, cfg.strategies.image_input))
    tokenizers = raw.get("tokenizers")  # a damaged file was named above; now: the right files?
    verify_files(
        run_dir, tokenizers.get("files") if isinstance(tokenizers, dict) else None, config_path
    )
    model = build_empty_model(paradigm, mcfg, bundle)  # built once, on the meta device
    _check_weights_fit(model, header, path)
    bundle.to(device)
    load_weights(model, path)
    model.to(device)
    seg = Segmenter(
        paradigm,
        model,
        bundle,
        cfg,
        device,
        batch_size=batch_size,
        compile=compile,
        speculative=speculative,
    )
    from mrisegcli.presence import load_presence

    seg.presence_head = load_presence(run_dir, raw.get("presence"), device)
    if seg.presence_head is not None:
        seg.presence_threshold = float(raw["presence"]["threshold"])
    seg.scope = raw.get("scope") if isinstance(raw.get("scope"), dict) else None
    from mrisegcli.postprocess import SECTION, min_component_share

    seg.min_component_share = min_component_share(raw.get(SECTION), config_path)
    return seg


__all__ = [
    "Segmenter",
    "Prediction",
    "build_empty_model",
    "build_model",
    "model_config",
    "load_segmenter",
    "load_weights",
    "save_model",
    "training_tensors",
    "to_dict",
]

"""Save / load a neural tokenizer as ONE ``.safetensors`` file that describes itself.

The safetensors header metadata holds ``kind`` ("mask_vq", "image_vq" or "multiscale"),
``mriseg_config`` (the frozen config dataclass as JSON) and ``format`` (this file layout's
version), so :func:`load_tokenizer` rebuilds the module from the file alone. Nothing is
pickled; a truncated or corrupt file, an unknown kind or a config that does not match the
stored tensors is a :class:`~mrisegcli.errors.ConfigError` naming the file.

A tokenizer is built to be loaded without memory or random initialisation (:func:`shapes_only`,
:func:`assign_weights`: the file's tensors take the place of the meta ones); the model loader
(``workflow/segmenter.py``) builds the model the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mrisegcli.errors import ConfigError, InputError
from mrisegcli.io.atomic import atomic_path
from mrisegcli.tokenizers.image_vq import ImageVQ, ImageVQConfig
from mrisegcli.tokenizers.mask_vq import MaskVQ, MaskVQConfig
from mrisegcli.tokenizers.multiscale import MultiScaleConfig, MultiScaleMaskQuantizer

FORMAT_VERSION = "1"

#: kind -> (module class, config class)
KINDS: dict[str, tuple[type[torch.nn.Module], type]] = {
    "mask_vq": (MaskVQ, MaskVQConfig),
    "image_vq": (ImageVQ, ImageVQConfig),
    "multiscale": (MultiScaleMaskQuantizer, MultiScaleConfig),
}

Tokenizer = MaskVQ | ImageVQ | MultiScaleMaskQuantizer


#: In-place tensor methods that only write values (what ``torch.nn.init``'s functions call):
#: on a meta tensor, which holds no values, they and ``torch.nn.init``'s functions are skipped,
#: so that building a module to be loaded runs no random initialisation (on the meta device
#: ``normal_`` alone would import torch's compiler, about a second).
VALUE_INITS = frozenset(
    {
        "normal_",
        "uniform_",
        "zero_",
        "fill_",
        "random_",
        "exponential_",
        "log_normal_",
        "cauchy_",
        "geometric_",
        "bernoulli_",
        "erfinv_",
    }
)
#: factories whose tensors :func:`shapes_only` makes on the meta device
_META_FACTORIES = (torch.empty, torch.zeros)
#: random factories, which :func:`shapes_only` answers with real zeros: on the meta device
#: they, and the arithmetic usually done on their result (a codebook's ``randn(V, C) * s``),
#: would import torch's compiler
_RANDOM_FACTORIES = (torch.randn, torch.rand)


def shapes_only() -> Any:
    """A mode in which ``torch.empty`` and ``torch.zeros`` (what parameters and large state
    buffers are made with) give meta tensors, without memory, and the initialisers that would
    fill them (:data:`VALUE_INITS`) do nothing; ``torch.randn`` and ``torch.rand`` (a
    tokenizer's codebook) give zeros, drawing nothing; index tensors (``arange``, ``full``,
    ``as_tensor``: positions, attention masks, small and bounded by the size limits) stay real,
    so that the code that derives them from data still runs."""
    from torch.overrides import TorchFunctionMode

    class ShapesOnly(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = dict(kwargs or {})
            if func in _META_FACTORIES:
                kwargs["device"] = "meta"
                return func(*args, **kwargs)
            if func in _RANDOM_FACTORIES:
                return torch.zeros(*args, dtype=kwargs.get("dtype"), device=kwargs.get("device"))
            target = args[0] if args else kwargs.get("tensor")
            initialiser = (
                getattr(func, "__module__", None) == "torch.nn.init"
                or getattr(func, "__name__", "") in VALUE_INITS
            )
            if initialiser and isinstance(target, torch.Tensor) and target.is_meta:
                return target
            return func(*args, **kwargs)

    return ShapesOnly()


def assign_weights(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put ``state``'s tensors in the place of the meta ones of a ``module`` built under
    :func:`shapes_only` (no copy, no random init thrown away), each in the dtype the module
    declares; what ``state`` leaves out (training-only buffers) becomes zeros."""
    want = module.state_dict()
    state = {k: v.to(want[k].dtype) if k in want else v for k, v in state.items()}
    module.load_state_dict(state, strict=False, assign=True)
    for sub in module.modules():  # zeros_like of a meta tensor would import sympy
        for name, p in sub.named_parameters(recurse=False):
            if p.is_meta:
                zeros = torch.zeros(p.shape, dtype=p.dtype)
                setattr(sub, name, torch.nn.Parameter(zeros, p.requires_grad))
        for name, b in sub.named_buffers(recurse=False):
            if b.is_meta:
                sub.register_buffer(
                    name,
                    torch.zeros(b.shape, dtype=b.dtype),
                    persistent=name not in sub._non_persistent_buffers_set,
                )


def kind_of(tok: torch.nn.Module) -> str:
    """The ``kind`` string under which ``tok`` is saved."""
    for kind, (cls, _) in KINDS.items():
        if type(tok) is cls:
            return kind
    raise TypeError(f"not a savable tokenizer: {type(tok).__name__}")


def config_to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def config_from_json(cfg_cls: type, text: str, path: str | Path | None = None) -> Any:
    """Rebuild a frozen config dataclass from JSON (lists become tuples); strict about keys."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"tokenizer config is not valid JSON ({err.msg})", path) from err
    if not isinstance(raw, dict):
        raise ConfigError("tokenizer config is not a JSON object", path)
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown tokenizer config keys {unknown} (newer version?)", path)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cfg_cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad tokenizer config ({err})", path) from err


def save_tokenizer(tok: torch.nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``tok`` (weights + config) to one ``.safetensors`` file, atomically."""
    kind = kind_of(tok)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tok.state_dict().items()}
    metadata = {
        "kind": kind,
        "mriseg_config": config_to_json(tok.cfg),
        "format": FORMAT_VERSION,
    }
    with atomic_path(path, overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a tokenizer file (cheap: reads no tensor data)."""
    return _open(path, read_tensors=False)[1]


def _open(path: str | Path, read_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise InputError("no such tokenizer file", path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if read_tensors else {}
    except Exception as err:  # safetensors raises several types for damaged files
        raise ConfigError(
            f"not a readable safetensors file, truncated or corrupt ({err})", path
        ) from err
    return tensors, meta


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild a tokenizer saved by :func:`save_tokenizer`, in eval mode on ``device``."""
    tensors, meta = _open(path, read_tensors=True)
    if meta.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise ConfigError(f"tokenizer file format {meta.get('format')!r} is not supported", path)
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(KINDS)}", path)
    if "mriseg_config" not in meta:
        raise ConfigError("tokenizer file has no 'mriseg_config' metadata", path)
    model_cls, cfg_cls = KINDS[kind]
    cfg = config_from_json(cfg_cls, meta["mriseg_config"], path)
    try:
        with shapes_only():  # built without memory or initialisation: the file fills it
            model = model_cls(cfg)
    except ConfigError as err:
        raise ConfigError(f"invalid tokenizer config ({err})", path) from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    bad = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or bad:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", bad))
            if keys
        )
        raise ConfigError(f"weights do not match the stored config ({detail})", path)
    assign_weights(model, tensors)
    return model.to(device).eval()

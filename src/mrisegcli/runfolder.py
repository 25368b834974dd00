"""The names of what a run folder holds: the one place every module takes them from.

``train`` writes a run folder; ``predict``, ``evaluate``, ``push`` and the Hub download read it::

    RUN/config.json             settings, data, tokenizer fingerprints, model (runinfo.py)
    RUN/model.safetensors       the best validation weights (or the last without a val split)
    RUN/metrics.json            best validation Dice, steps, seconds, tokenizer reports
    RUN/train_log.jsonl         one JSON record per logged step and per validation
    RUN/progress.png            training loss and validation Dice over steps
    RUN/README.md               the model card ``push`` uploads
    RUN/mask_vq.safetensors     tokenizers (the ones the paradigm needs)
    RUN/image_vq.safetensors
    RUN/multiscale.safetensors
    RUN/tokenizer.json          the text tokenizer (with tokenizer_config.json and, from the
                                Hub, special_tokens_map.json)
    RUN/presence.safetensors    the presence head (is the prompt's target there at all?),
                                its threshold and report in config.json "presence"
    RUN/checkpoints/            step_NNNNNNNN.safetensors, the last few
    RUN/cache/                  the code cache (index.json, shard-NNNNN.safetensors)
    RUN/.mriseg.lock            held while ``train`` writes the folder
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.json"
MODEL = "model.safetensors"
METRICS = "metrics.json"
TRAIN_LOG = "train_log.jsonl"
PROGRESS = "progress.png"
CARD = "README.md"
CHECKPOINTS = "checkpoints"
CACHE = "cache"
LOCK = ".mriseg.lock"
PRESENCE = "presence.safetensors"
#: tokenizer role -> file (the text tokenizer is TEXT_TOKENIZER)
TOKENIZERS = {"mask_vq": "mask_vq.safetensors", "image_vq": "image_vq.safetensors",
              "multiscale": "multiscale.safetensors"}  # fmt: skip
TEXT_TOKENIZER = "tokenizer.json"
#: the files of a saved text tokenizer (Hugging Face layout)
TEXT_TOKENIZER_CONFIG = "tokenizer_config.json"
TEXT_TOKENIZER_FILES = (TEXT_TOKENIZER, TEXT_TOKENIZER_CONFIG)
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
#: a checkpoint in CHECKPOINTS: ``step_NNNNNNNN.safetensors`` (regular expression, the step
#: its one group; :func:`checkpoint_name` writes it)
CHECKPOINT_PATTERN = r"step_(\d{8})\.safetensors"
#: the temp name ``io.atomic.atomic_path`` gives a checkpoint while it is written:
#: ``.step_NNNNNNNN.<random>.tmp.safetensors``
CHECKPOINT_TEMP_PATTERN = r"\.step_\d{8}\.[A-Za-z0-9_]+\.tmp\.safetensors"


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint of ``step`` in CHECKPOINTS."""
    return f"step_{step:08d}.safetensors"


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def train_log(self) -> Path:
        return self.root / TRAIN_LOG

    @property
    def progress(self) -> Path:
        return self.root / PROGRESS

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def cache(self) -> Path:
        return self.root / CACHE


__all__ = [
    "CACHE",
    "CARD",
    "CHECKPOINTS",
    "CHECKPOINT_PATTERN",
    "CHECKPOINT_TEMP_PATTERN",
    "CONFIG",
    "LOCK",
    "METRICS",
    "MODEL",
    "PROGRESS",
    "RunPaths",
    "SPECIAL_TOKENS_MAP",
    "TEXT_TOKENIZER",
    "TEXT_TOKENIZER_CONFIG",
    "TEXT_TOKENIZER_FILES",
    "TOKENIZERS",
    "TRAIN_LOG",
    "checkpoint_name",
]

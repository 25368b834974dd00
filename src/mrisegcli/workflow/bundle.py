"""The tokenizers of a run, saved side by side in one folder and loaded together.

A bundle folder (a run folder, or the output of ``mriseg tokenize``) holds
``mask_vq.safetensors`` (next-token), ``image_vq.safetensors`` (next-token with image codes),
``multiscale.safetensors`` (next-scale) and ``tokenizer.json`` (text). Its fingerprint, a
hash of every tokenizer's weights and config, ties a code cache to the tokenizers that made it.

A run's ``config.json`` also records each tokenizer file with its role and the sha256 of its
bytes (:func:`file_fingerprints`); loading a model checks them (:func:`verify_files`), so
tokenizers swapped or copied in from another run are refused by name instead of producing
nonsense. The model weights are recorded the same way by the one function that writes them
(:mod:`mrisegcli.weights`); the config itself is not fingerprinted (a shipped model edits its
data paths).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrisegcli import runfolder
from mrisegcli.errors import MrisegError

FILES = runfolder.TOKENIZERS
TEXT_FILE = runfolder.TEXT_TOKENIZER
#: file -> role, of every file whose fingerprint a run records
ROLES = {**{file: role for role, file in FILES.items()}, TEXT_FILE: "text"}
_ROLE_NAMES = {
    "mask_vq": "mask tokenizer",
    "image_vq": "image tokenizer",
    "multiscale": "multi-scale mask tokenizer",
    "text": "text tokenizer",
}


@dataclass
class TokenizerBundle:
    text: Any  # a transformers fast tokenizer, or a TextTokenizer (tokenizers/text.py)
    mask_vq: Any | None = None
    image_vq: Any | None = None
    multiscale: Any | None = None

    def present(self) -> list[str]:
        return [name for name in FILES if getattr(self, name) is not None]

    def fingerprint(self) -> str:
        """Hash of the weights and configs of every tokenizer present (and the text vocab)."""
        from mrisegcli.tokenizers.cache import state_fingerprint

        h = hashlib.blake2b(digest_size=16)
        for name in FILES:
            tok = getattr(self, name)
            if tok is not None:
                h.update(name.encode())
                h.update(state_fingerprint(tok.state_dict(), getattr(tok, "cfg", None)).encode())
        h.update(self.text.backend_tokenizer.to_str().encode())
        return h.hexdigest()

    def to(self, device: Any) -> TokenizerBundle:
        for name in FILES:
            tok = getattr(self, name)
            if tok is not None:
                tok.to(device).eval()
        return self


def save_bundle(bundle: TokenizerBundle, folder: Path, *, overwrite: bool = False) -> None:
    from mrisegcli.tokenizers.serialize import save_tokenizer
    from mrisegcli.tokenizers.text import save_text_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name, file in FILES.items():
        tok = getattr(bundle, name)
        if tok is not None:
            save_tokenizer(tok, folder / file, overwrite=overwrite)
    save_text_tokenizer(bundle.text, folder, overwrite=overwrite)


def copy_bundle(src: Path, dst: Path) -> None:
    """Copy a bundle's files byte for byte (the run records exactly the tokenizers it used)."""
    from mrisegcli.io.atomic import atomic_write_bytes

    names = [*FILES.values(), *runfolder.TEXT_TOKENIZER_FILES, runfolder.SPECIAL_TOKENS_MAP]
    for name in names:
        if (src / name).is_file():
            atomic_write_bytes(dst / name, (src / name).read_bytes(), overwrite=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprints(folder: Path) -> dict[str, dict[str, str]]:
    """``{file: {"role": role, "sha256": hex}}`` of every tokenizer file in ``folder``."""
    folder = Path(folder)
    return {
        name: {"role": role, "sha256": file_sha256(folder / name)}
        for name, role in ROLES.items()
        if (folder / name).is_file()
    }


def verify_files(folder: Path, recorded: Any, config_path: Path | None = None) -> None:
    """Check the tokenizer files of ``folder`` against the entries a run recorded at training
    time (``config["tokenizers"]["files"]``); None (a run written before they were recorded)
    checks nothing. A missing, swapped or foreign file is a :class:`ConfigError` naming it."""
    from mrisegcli.errors import ConfigError

    if recorded is None:
        return
    folder = Path(folder)
    where = config_path if config_path is not None else folder / runfolder.CONFIG
    if not isinstance(recorded, dict):
        raise ConfigError("corrupt config (tokenizers.files is not an object)", where)
    for name, entry in recorded.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("role"), str)
            and isinstance(entry.get("sha256"), str)
        )
        if name not in ROLES or not ok or entry["role"] != ROLES[name]:
            raise ConfigError(
                f"corrupt config (tokenizers.files has a bad entry for {name!r})", where
            )
    by_hash = {entry["sha256"]: name for name, entry in recorded.items()}
    for name, entry in recorded.items():
        path = folder / name
        what = _ROLE_NAMES[entry["role"]]
        if not path.is_file():
            raise ConfigError(f"missing: the model was trained with this {what}", path)
        digest = file_sha256(path)
        if digest == entry["sha256"]:
            continue
        other = by_hash.get(digest)
        if other is not None:
            raise ConfigError(
                f"is the run's {other}, not its {what} (tokenizer files swapped?)", path
            )
        raise ConfigError(
            f"not the {what} this model was trained with (sha256 {digest[:12]}..., config.json "
            f"records {entry['sha256'][:12]}...): tokenizers from another run? Put back the "
            "run's own file",
            path,
        )


def has_bundle(folder: Path) -> bool:
    return (folder / TEXT_FILE).is_file() and any((folder / f).is_file() for f in FILES.values())


def load_bundle(
    folder: Path, *, need: tuple[str, ...] = (), device: str = "cpu"
) -> TokenizerBundle:
    """Load every tokenizer found in ``folder``; those named in ``need`` must be there."""
    from mrisegcli.errors import ConfigError
    from mrisegcli.tokenizers.serialize import kind_of, load_tokenizer
    from mrisegcli.tokenizers.text import read_text_tokenizer

    folder = Path(folder)
    if not (folder / TEXT_FILE).is_file():
        raise MrisegError(f"no tokenizers here (no {TEXT_FILE})", folder)
    missing = [FILES[n] for n in need if not (folder / FILES[n]).is_file()]
    if missing:
        raise MrisegError(
            f"tokenizer folder lacks {', '.join(missing)} (needed for this paradigm)", folder
        )
    parts = {
        n: load_tokenizer(folder / f, device=device)
        for n, f in FILES.items()
        if (folder / f).is_file()
    }
    for name, tok in parts.items():
        if kind_of(tok) != name:  # e.g. mask_vq.safetensors and image_vq.safetensors swapped
            raise ConfigError(
                f"holds the {kind_of(tok)} tokenizer, not the {name} one (tokenizer files swapped?)",
                folder / FILES[name],
            )
        tok.eval()
    return TokenizerBundle(text=read_text_tokenizer(folder), **parts)


def needed_tokenizers(paradigm: str, image_input: str = "codes") -> tuple[str, ...]:
    from mrisegcli.paradigms import get_paradigm

    return get_paradigm(paradigm).tokenizers(image_input)

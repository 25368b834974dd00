"""Text tokenizer for the referring descriptions: train, save, load, encode.

Model: WordPiece with a fixed pipeline, because the descriptions are short, repetitive clinical
phrases ("Bilateral pulmonary infection, two infected areas, ..."): frequent words become single
tokens, rare or unseen words fall back to sub-words (never a silent merge with a known word), and
greedy longest-match lookup needs no merge table at run time.

* normaliser: format characters (soft hyphen, zero-width space) removed, control characters ->
  space, NFKD (the NFKC compatibility folding: full-width letters, ligatures, ...) followed by
  accent stripping, lower-casing, NFC.
* pre-tokenizer: split on whitespace, then every punctuation character on its own.
* special tokens with fixed ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3.

The vocabulary is learnt here rather than by the ``tokenizers`` trainer: that trainer breaks ties
between equally frequent pairs in hash-map order, so the same texts give a different vocabulary
in every process. The learner below uses the same criterion (most frequent adjacent pair, with
the ``##`` continuation prefix) and breaks ties by the pair's text, so training is reproducible.
Run time (normalising, splitting, lookup, saving) is the ``tokenizers`` library.
"""

from __future__ import annotations

import heapq
import json
import re
import shutil
import string
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from mrisegcli import runfolder
from mrisegcli.errors import InputError, MrisegError
from mrisegcli.io.atomic import atomic_path, check_writable

if TYPE_CHECKING:  # transformers takes about a second to import: only where it is needed
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP)  # ids 0, 1, 2, 3
CONTINUE = "##"
#: always in the vocabulary (word-initial and ``##`` forms), so any ASCII word splits into pieces
BASE_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
TOKENIZER_FILES = runfolder.TEXT_TOKENIZER_FILES
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _pipeline(vocab: dict[str, int], synonyms: bool | str = True) -> Tokenizer:
    """The fixed normaliser / pre-tokenizer / WordPiece model around ``vocab``.

    ``synonyms``: fold clinical synonyms onto the training words (``data/paraphrase.py``) as the
    last normalising steps, the rule set named ("chest", "brain"; ``True`` is "chest"); they are
    saved in ``tokenizer.json`` with the rest.
    """
    from mrisegcli.data.paraphrase import RULE_SETS

    rules = RULE_SETS["chest" if synonyms is True else synonyms] if synonyms else ()

    tk = Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=CONTINUE))
    steps = [
        normalizers.Replace(Regex(r"\p{Cf}"), ""),
        normalizers.Replace(Regex(r"\p{Cc}"), " "),
        normalizers.NFKD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.NFC(),
    ]
    steps += [normalizers.Replace(Regex(pattern), repl) for pattern, repl in rules]
    tk.normalizer = normalizers.Sequence(steps)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tk.decoder = decoders.WordPiece(prefix=CONTINUE)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    return tk


def _wrap(tk: Tokenizer) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, unk_token=UNK, cls_token=CLS, sep_token=SEP
    )


def with_synonym_rules(
    tok: PreTrainedTokenizerBase, synonyms: bool | str
) -> PreTrainedTokenizerFast:
    """A text tokenizer with ``tok``'s vocabulary and today's pipeline, whose normaliser folds
    the synonym rule set ``synonyms`` ("chest", "brain"; ``True`` is "chest"; ``False`` none)."""
    return _wrap(_pipeline(dict(tok.get_vocab()), synonyms))


def text_normalizer(synonyms: bool | str = True) -> Callable[[str], str]:
    """The text normaliser of the pipeline (with the synonym rule set ``synonyms``, as in
    :func:`with_synonym_rules`): a text as a model trained today reads it."""
    return _pipeline(
        {t: i for i, t in enumerate(SPECIAL_TOKENS)}, synonyms
    ).normalizer.normalize_str


def _merge(left: str, right: str) -> str:
    return left + right[len(CONTINUE) :]


def _merged(syms: list[str], pair: tuple[str, str], new: str) -> list[str]:
    """``syms`` with every occurrence of ``pair`` (left to right) replaced by ``new``."""
    merged, j = [], 0
    while j < len(syms):
        if j + 1 < len(syms) and (syms[j], syms[j + 1]) == pair:
            merged.append(new)
            j += 2
        else:
            merged.append(syms[j])
            j += 1
    return merged


def _apply_merge(
    pair: tuple[str, str],
    new: str,
    symbols: list[list[str]],
    freqs: list[int],
    pair_counts: Counter[tuple[str, str]],
    pair_words: dict[tuple[str, str], set[int]],
) -> set[tuple[str, str]]:
    """Merge ``pair`` into ``new`` in every word that holds it, updating the pair counts and
    the word index in place; returns the pairs whose counts changed."""
    touched: set[tuple[str, str]] = set()
    for i in sorted(pair_words.pop(pair, ())):
        syms, f = symbols[i], freqs[i]
        for p in pairwise(syms):
            pair_counts[p] -= f
            touched.add(p)
        merged = _merged(syms, pair, new)
        symbols[i] = merged
        for p in pairwise(merged):
            pair_counts[p] += f
            pair_words.setdefault(p, set()).add(i)
            touched.add(p)
    return touched


def _learn_vocab(word_counts: Counter[str], vocab_size: int, min_frequency: int) -> list[str]:
    """Deterministic WordPiece vocabulary: specials, alphabet, then most-frequent-pair merges."""
    alphabet = set(BASE_ALPHABET)
    for word in word_counts:
        alphabet.update(word)
    vocab = list(SPECIAL_TOKENS) + sorted(alphabet) + sorted(CONTINUE + c for c in alphabet)
    known = set(vocab)

    words = sorted(word_counts)  # fixed order: the result never depends on hashing
    freqs = [word_counts[w] for w in words]
    symbols = [[w[0]] + [CONTINUE + c for c in w[1:]] for w in words]
    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}
    for i, syms in enumerate(symbols):
        for pair in pairwise(syms):
            pair_counts[pair] += freqs[i]
            pair_words.setdefault(pair, set()).add(i)
    # max-heap on count, ties broken by the pair's text; stale entries skipped when popped
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale
        if -neg < min_frequency:
            break
        new = _merge(*pair)
        if new not in known:
            known.add(new)
            vocab.append(new)
        touched = _apply_merge(pair, new, symbols, freqs, pair_counts, pair_words)
        for p in touched:
            n = pair_counts.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, p))
            else:
                pair_counts.pop(p, None)
    return vocab


def train_text_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    *,
    min_frequency: int = 1,
    synonyms: bool | str = True,
) -> PreTrainedTokenizerFast:
    """Learn a WordPiece tokenizer from ``texts`` (deterministic: same texts -> same tokenizer).

    ``vocab_size`` caps the merges; the specials and the alphabet (ASCII letters, digits,
    punctuation plus every character seen, each also in ``##`` form) are always included, so the
    result can be slightly larger than ``vocab_size`` when that is very small. Merges seen fewer
    than ``min_frequency`` times are not learnt. ``synonyms`` builds the synonym rules into the
    normaliser (see ``_pipeline``): ``True`` picks the rule set whose words the texts use
    (:func:`~mrisegcli.data.paraphrase.synonym_domain`), a name picks that set.
    """
    from mrisegcli.data.paraphrase import synonym_domain

    if vocab_size < 1 or min_frequency < 1:
        raise ValueError("vocab_size and min_frequency must be >= 1")
    texts = list(texts)
    if synonyms is True:
        synonyms = synonym_domain(texts)
    pipe = _pipeline({t: i for i, t in enumerate(SPECIAL_TOKENS)}, synonyms)
    counts: Counter[str] = Counter()
    n_texts = 0
    for text in texts:
        n_texts += 1
        norm = pipe.normalizer.normalize_str(text)
        counts.update(w for w, _ in pipe.pre_tokenizer.pre_tokenize_str(norm))
    if not counts:
        raise MrisegError(f"no words to train the text tokenizer on ({n_texts} texts, all empty)")
    vocab = _learn_vocab(counts, vocab_size, min_frequency)
    return _wrap(_pipeline({t: i for i, t in enumerate(vocab)}, synonyms))


def save_text_tokenizer(
    tok: PreTrainedTokenizerBase, folder: str | Path, *, overwrite: bool = False
) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``; return the json.

    Each file is renamed into place only once complete; nothing is written if either file exists
    and ``overwrite`` is false.
    """
    folder = Path(folder)
    for name in TOKENIZER_FILES:
        check_writable(folder / name, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=folder))
    try:
        tok.save_pretrained(str(staging))
        for name in TOKENIZER_FILES:
            src = staging / name
            if src.exists():
                with atomic_path(folder / name, overwrite) as tmp:
                    src.replace(tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / runfolder.TEXT_TOKENIZER


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


_SPECIAL_NAMES = (
    "pad_token",
    "unk_token",
    "cls_token",
    "sep_token",
    "bos_token",
    "eos_token",
    "mask_token",
)


def _specials_in(tk: Tokenizer) -> dict[str, str]:
    vocab = tk.get_vocab()
    names = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP}
    return {k: v for k, v in names.items() if v in vocab}


def _load_json(file: Path) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    try:
        tk = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust loader raises a bare Exception
        raise InputError(f"not a valid tokenizer.json ({_first_line(err)})", file) from err
    return PreTrainedTokenizerFast(tokenizer_object=tk, **_specials_in(tk))


def load_text_tokenizer(path_or_id: str | Path) -> PreTrainedTokenizerBase:
    """Load a text tokenizer from a run folder, a folder or file ``tokenizer.json``, or a Hub id.

    A Hub id goes through ``transformers.AutoTokenizer`` and so honours ``HF_HUB_OFFLINE`` and
    the local Hub cache.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path_or_id)
    if path.is_file():
        return _load_json(path)
    if path.is_dir():
        file = path / runfolder.TEXT_TOKENIZER
        if not file.is_file():
            raise InputError("no tokenizer.json in this folder", path)
        if not (path / runfolder.TEXT_TOKENIZER_CONFIG).is_file():
            return _load_json(file)
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        except Exception as err:
            raise InputError(f"cannot load the text tokenizer ({_first_line(err)})", path) from err
    name = str(path_or_id)
    if not _HUB_ID.match(name) or name.endswith(".json"):
        raise InputError("no such file or folder", path)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # OSError offline / not found, ValueError for odd repos
        raise MrisegError(
            f"text tokenizer {name!r} is not a local file or folder and could not be loaded from "
            "the Hugging Face Hub (not in the local cache, or offline with HF_HUB_OFFLINE=1): "
            f"{_first_line(err)}"
        ) from err


#: the ``tokenizer_config.json`` entries of a tokenizer :class:`TextTokenizer` reads as
#: transformers would; a file with any other entry is loaded by transformers
_PLAIN_CONFIG = {"backend", "tokenizer_class", "model_max_length", *_SPECIAL_NAMES}
_PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class TextTokenizer:
    """A run's text tokenizer read by the ``tokenizers`` library alone: the content ids of
    texts (:func:`token_ids`), the pad id, the vocabulary, the size and the normaliser, the
    same as :func:`load_text_tokenizer`'s transformers tokenizer gives them, without importing
    transformers (about a second). Anything else (saving, decoding, ...) is asked of that
    transformers tokenizer, loaded from the same folder on first use (:attr:`full`).

    Made by :func:`read_text_tokenizer` only for files whose every setting it reads itself."""

    def __init__(self, backend: Tokenizer, specials: dict[str, str], folder: Path) -> None:
        self.backend_tokenizer = backend
        self.specials = dict(specials)  # e.g. {"pad_token": "[PAD]", ...}
        self.folder = Path(folder)
        self._full: PreTrainedTokenizerBase | None = None

    @property
    def full(self) -> PreTrainedTokenizerBase:
        """The transformers tokenizer of the same folder (loaded once); it must still be the
        tokenizer read here."""
        if self._full is None:
            full = load_text_tokenizer(self.folder)
            if full.backend_tokenizer.to_str() != self.backend_tokenizer.to_str():
                raise MrisegError(
                    "the text tokenizer changed on disk since it was loaded", self.folder
                )
            self._full = full
        return self._full

    def __getattr__(self, name: str) -> Any:  # only for what is not defined here
        if name.startswith("_") or name == "full":  # not while unpickling or failing to load
            raise AttributeError(name)
        return getattr(self.full, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.full(*args, **kwargs)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int | None:
        token = self.specials.get(name)
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def content_ids(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text without [CLS]/[SEP], padding or truncation: what transformers'
        ``tok(texts, add_special_tokens=False, truncation=False)["input_ids"]`` gives."""
        encodings = self.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings]


def _plain_specials(tk: Tokenizer, config: Any) -> dict[str, str] | None:
    """The special tokens of a ``tokenizer_config.json`` that :class:`TextTokenizer` reads as
    transformers does (only entries mriseg writes; every special an added special token of
    ``tk``; no padding or truncation in ``tk``), else None."""
    if not isinstance(config, dict) or not set(config) <= _PLAIN_CONFIG:
        return None
    if config.get("tokenizer_class", _PLAIN_CLASSES[0]) not in _PLAIN_CLASSES:
        return None
    if config.get("backend", "tokenizers") != "tokenizers":
        return None
    if tk.padding is not None or tk.truncation is not None or tk.encode_special_tokens:
        return None
    added = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
    specials = {k: v for k, v in config.items() if k in _SPECIAL_NAMES}
    if not all(isinstance(v, str) and v in added for v in specials.values()):
        return None
    return specials


def read_text_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase | TextTokenizer:
    """The text tokenizer of a run or bundle folder: a :class:`TextTokenizer` (no transformers
    import) when its ``tokenizer_config.json`` holds only what mriseg writes, else
    :func:`load_text_tokenizer`'s transformers tokenizer. Errors as :func:`load_text_tokenizer`."""
    folder = Path(folder)
    file, config_file = folder / runfolder.TEXT_TOKENIZER, folder / runfolder.TEXT_TOKENIZER_CONFIG
    if not (file.is_file() and config_file.is_file()):
        return load_text_tokenizer(folder)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        tk = Tokenizer.from_file(str(file))
    except Exception:  # the Rust loader raises a bare Exception
        return load_text_tokenizer(folder)  # which names the problem as it always has
    specials = _plain_specials(tk, config)
    if specials is None:
        return load_text_tokenizer(folder)
    return TextTokenizer(tk, specials, folder)


def text_vocab_size(tok: PreTrainedTokenizerBase) -> int:
    """Number of ids the tokenizer can emit (embedding table size), added tokens included."""
    return len(tok)


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    """The padding id: the tokenizer's pad token, else its eos token, else 0."""
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def token_ids(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """The token ids of each text, content only: no [CLS]/[SEP], no padding, no truncation
    (what :func:`encode_texts` cuts and pads)."""
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must be str, got {type(t).__name__}")
    if not texts:
        return []
    if isinstance(tok, TextTokenizer):
        return tok.content_ids(list(texts))
    return tok(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def encode_texts(
    tok: PreTrainedTokenizerBase, texts: list[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``texts`` to ``(ids_BL, mask_BL)``: int64 ids padded with the pad id, bool mask.

    Only content tokens are emitted ([CLS]/[SEP] are left to the sequence builder). A text
    longer than ``max_len`` tokens is cut to its first ``max_len`` (see ``count_truncated``). An
    empty or whitespace-only text gives a row of padding with an all-False mask: the model then
    sees no text at all, only its image tokens.
    """
    return pad_token_rows(tok, token_ids(tok, texts), max_len)


def pad_token_rows(
    tok: PreTrainedTokenizerBase, rows: list[list[int]], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of :func:`token_ids` -> ``(ids_BL, mask_BL)`` as :func:`encode_texts` gives them:
    each cut to ``max_len`` and padded with ``tok``'s pad id."""
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    rows = [row[:max_len] for row in rows]
    pad = pad_id(tok)
    ids_BL = torch.tensor([row + [pad] * (max_len - len(row)) for row in rows], dtype=torch.int64)
    lens_B = torch.tensor([len(row) for row in rows], dtype=torch.int64)
    mask_BL = torch.arange(max_len) < lens_B[:, None]  # (B, L)
    return ids_BL.reshape(len(rows), max_len), mask_BL


def longest_text(tok: PreTrainedTokenizerBase, texts: list[str]) -> int:
    """The largest number of content tokens among ``texts`` (0 for none)."""
    return max((len(row) for row in token_ids(tok, list(dict.fromkeys(texts)))), default=0)


def count_truncated(tok: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> int:
    """How many of ``texts`` have more than ``max_len`` tokens (and are cut by ``encode_texts``)."""
    return sum(len(row) > max_len for row in token_ids(tok, texts))

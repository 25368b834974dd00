"""What a model answers: its targets and vocabulary, and refusal of prompts outside them.

A referring model trained on "infection" and "left lung" has no idea what a "pleural effusion"
is; without a check, the text tokenizer spells the unknown word letter by letter and the model
draws "some lung". Every run folder therefore records its **scope** (``config.json`` ``"scope"``):

* ``targets``: the targets it was trained on (the manifest's ``target`` column, with the rows
  of each and example prompts), or, without that column, the training texts' most frequent
  content words;
* ``vocabulary``: every content word of the training texts (their rewordings included) after
  the text tokenizer's normaliser, so after synonym folding ("consolidation" is "infection").

A prompt is in scope when each of its content words, after the same normaliser, is in the
vocabulary, allowing spelling variants (British/American: "tumour"/"tumor", "oedema"/"edema",
"-ise"/"-ize"), plurals and one-letter typos of words of four or more letters. Function words
and request words ("the", "in", "please") are never content words. A prompt with an unknown
word is refused, naming the word(s) and what the model answers; ``--force`` runs it anyway.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

#: function words, question and request words, words that describe the picture rather than
#: what is in it, words of extent that say "all of it" as "all" does, the radiograph's words
#: of position that say "over" ("projected over", "overlying"), and the framing and hedging
#: of a report ("findings of", "in keeping with", "suspicious for", "confined to", "mainly"),
#: which say how sure or how exclusive, not what: never content words
STOPWORDS = frozenset(
    """a an the this that these those there here it its of in on at to into onto within inside
    from for with without by as and or nor but not no any all each every some both either
    is are was were be been being am do does did done has have had can could would should may
    might must will shall please kindly just only also very more most much many
    what which where who whom whose how why when whether
    around near next along across beside behind beneath between over under about
    involving affecting containing including
    i me my we our you your he she his her they them their
    show find segment outline mark locate display highlight identify detect label annotate
    indicate draw give get make see seen look give tell point delineate depict
    image images picture scan scans slice slices film view study exam examination region regions
    area areas part parts portion portions mask masks visible present seen noted
    evidence appearance appearing appears apparent shown showing there's
    patient patients s
    whole entire entirely full fully complete completely total totally entirety
    projected projecting projects overlying overlies overlie
    finding findings sign signs feature features consistent compatible keeping suggestive
    suggesting suggests suspicious concerning likely possible possibly probable probably
    representing represents represent confined limited restricted localised localized
    predominantly predominant mainly mostly largely""".split()
)

_WORD = re.compile(r"[a-z]+|\d+")
#: (pattern, replacement) spelling variants tried in both directions
_VARIANTS = (
    ("our", "or"),
    ("oe", "e"),
    ("ae", "e"),
    ("ise", "ize"),
    ("isation", "ization"),
    ("yse", "yze"),
    ("tre", "ter"),
    ("ll", "l"),
)

Normalize = Callable[[str], str]


def content_words(text: str, normalize: Normalize) -> list[str]:
    """The content words of ``text`` after ``normalize`` (the tokenizer's normaliser)."""
    return [w for w in _WORD.findall(normalize(text)) if w not in STOPWORDS and not w.isdigit()]


def _variants(word: str) -> set[str]:
    out = {word}
    for a, b in _VARIANTS:
        for x, y in ((a, b), (b, a)):
            if x in word:
                out.add(word.replace(x, y))
    for w in list(out):  # plurals
        if w.endswith("ies") and len(w) > 4:
            out.add(w[:-3] + "y")
        if w.endswith("es") and len(w) > 3:
            out.add(w[:-2])
        if w.endswith("s") and len(w) > 3:
            out.add(w[:-1])
        out.update({w + "s", w + "es"})
    return out


def _one_edit(a: str, b: str) -> bool:
    """``a`` and ``b`` differ by one substitution, insertion, deletion or swap of neighbours."""
    if a == b or abs(len(a) - len(b)) > 1:
        return a == b
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    return a[i:] == b[i + 1 :]


def is_known(word: str, vocabulary: set[str] | frozenset[str]) -> bool:
    """``word`` is in ``vocabulary`` up to spelling variants, plurals and one-letter typos."""
    if len(word) <= 1 or word in STOPWORDS or word.isdigit():
        return True
    if _variants(word) & vocabulary:
        return True
    if len(word) >= 4:
        return any(len(v) >= 4 and _one_edit(word, v) for v in vocabulary)
    return False


def unknown_words(text: str, scope: dict[str, Any], normalize: Normalize) -> list[str]:
    """The content words of ``text`` that the model with ``scope`` never learnt (in order,
    once each); empty when the prompt is in scope."""
    vocab = frozenset(scope.get("vocabulary", ()))
    out: list[str] = []
    for w in content_words(text, normalize):
        if not is_known(w, vocab) and w not in out:
            out.append(w)
    return out


def build_scope(
    texts: Sequence[str],
    targets: Sequence[str],
    normalize: Normalize,
    *,
    examples: int = 3,
    extra_texts: Iterable[str] = (),
) -> dict[str, Any]:
    """The scope of a model trained on ``texts`` (one per train row, with its ``target``, ""
    when the data has none); ``extra_texts`` (rewordings) widen the vocabulary only."""
    vocab: set[str] = set()
    for t in list(texts) + list(extra_texts):
        vocab.update(content_words(t, normalize))
    by_target: dict[str, list[str]] = {}
    counts: Counter[str] = Counter()
    for text, target in zip(texts, targets, strict=True):
        if target:
            counts[target] += 1
            seen = by_target.setdefault(target, [])
            if text not in seen and len(seen) < examples:
                seen.append(text)
    if counts:
        listed = [
            {"target": t, "rows": n, "examples": by_target[t]}
            for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            if t != "none"
        ]
        absent = counts.get("none", 0)
    else:  # no target column: the most frequent content words, each with an example text
        words: Counter[str] = Counter()
        first: dict[str, str] = {}
        for text in texts:
            for w in set(content_words(text, normalize)):
                words[w] += 1
                first.setdefault(w, text)
        listed = [
            {"target": w, "rows": n, "examples": [first[w]]} for w, n in words.most_common(12)
        ]
        absent = 0
    return {
        "targets": listed,
        "absent_rows": absent,
        "vocabulary": sorted(vocab),
        "source": "target column" if counts else "training texts",
    }


def describe_scope(scope: dict[str, Any], limit: int = 6) -> str:
    """One line: what the model answers ("infection (all), lung (left), ...")."""
    names = [str(t.get("target", "")) for t in scope.get("targets", [])][:limit]
    more = len(scope.get("targets", [])) - len(names)
    text = ", ".join(n for n in names if n)
    return text + (f" and {more} more" if more > 0 else "")


def refusal(text: str, scope: dict[str, Any] | None, normalize: Normalize) -> str | None:
    """The one-line reason ``text`` is refused, or ``None`` when it is in scope (or the model
    records no scope)."""
    if not scope or not scope.get("vocabulary"):
        return None
    unknown = unknown_words(text, scope, normalize)
    if not unknown and content_words(text, normalize):
        return None
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:5])
        what = f"word(s) this model never learnt: {shown}"
    else:
        what = "names nothing this model looks for"
    return (
        f"prompt refused, {what}; it answers {describe_scope(scope)} "
        "(mriseg models NAME lists them; --force runs it anyway)"
    )


__all__ = [
    "STOPWORDS",
    "build_scope",
    "content_words",
    "describe_scope",
    "is_known",
    "refusal",
    "unknown_words",
]

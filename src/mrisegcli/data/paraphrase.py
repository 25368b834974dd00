"""Other wordings of the same request: synonym rules for the text tokenizer and paraphrases
generated from a manifest's ``target`` column.

Users do not write the training sentences. Two things make a model answer their wording:

* :data:`SYNONYM_RULES` fold clinical synonyms onto the words the training texts use
  ("consolidation", "ground-glass opacity", "airspace disease" -> "infection"; "lobe" ->
  "zone"; "cardiac silhouette" -> "heart"; "RLL" -> "right lower zone"; ...). They run inside
  the text tokenizer's normaliser (``tokenizers/text.py``), so they are saved in
  ``tokenizer.json`` with the run and apply alike in training and at inference.
* :func:`paraphrase` writes other sentences for a ``target`` ("infection:left",
  "infection:left+right:lower", "lung:both", "heart", "nodule:right:upper", ...): training adds
  them as extra rows (``--paraphrases N``), so the model sees many sentence shapes per target.

Wordings kept for measuring (``examples/cxr_paraphrase_testset.py``) are never produced here.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable

from mrisegcli.data.layouts import Dataset, Sample

#: (regex, replacement) applied in order to the lower-cased text; word boundaries keep them from
#: touching other words. Only words that carry no other meaning in the texts we know are folded.
_CHEST_RULES: tuple[tuple[str, str], ...] = (
    # findings -> "infection" (multi-word forms first)
    (
        r"\bground[- ]?glass (?:opacit(?:y|ies)|opacifications?|changes?|densit(?:y|ies))\b",
        "infection",
    ),
    (r"\bground[- ]?glass\b", "infection"),
    (r"\bggos?\b", "infection"),
    (r"\bnodular (?:opacit(?:y|ies)|lesions?|densit(?:y|ies))\b", "nodule"),
    (r"\bmass(?:es)?\b", "nodule"),
    (r"\bnodules\b", "nodule"),
    (r"\bair[- ]?space (?:disease|opacit(?:y|ies)|shadowing)\b", "infection"),
    (r"\bcovid(?:[- ]?19)? (?:pneumonia|infection)\b", "infection"),
    (
        r"\b(?:opacit(?:y|ies)|opacifications?|consolidations?|consolidative changes?|infiltrates?"
        r"|infiltrations?|pneumonia|pneumonitis|shadowing|haziness|infections|lesions?)\b",
        "infection",
    ),
    # anatomy: the organ named by its outline, region or tissue is the organ
    (
        r"\b(?:cardio(?:mediastinal|thoracic)?|cardiac|heart) (?:silhouette|shadow|contour"
        r"|outline|borders?|margins?|region|area)\b",
        "heart",
    ),
    (r"\b(?:silhouette|shadow|contour|outline|borders?|margins?) of the heart\b", "heart"),
    (r"\bcardiac\b", "heart"),
    (r"\bcollar[- ]?bones?\b", "clavicle"),
    (r"\bclavicular\b", "clavicle"),
    (r"\b(?:lung|pulmonary) fields\b", "lungs"),
    (r"\b(?:lung|pulmonary) field\b", "lung"),
    (r"\b(?:lung|pulmonary) parenchyma\b", "lung"),
    (r"\bparenchyma(?:l)?\b", "lung"),
    (r"\bhemithoraces\b", "lungs"),
    (r"\bhemithorax\b", "lung"),
    (r"\b(?:the two|both the|two|left and right|right and left) lungs\b", "both lungs"),
    # places
    (r"\brul\b", "right upper zone"),
    (r"\brml\b", "right middle zone"),
    (r"\brll\b", "right lower zone"),
    (r"\blul\b", "left upper zone"),
    (r"\blll\b", "left lower zone"),
    (r"\blingula(?:r)?\b", "left middle zone"),
    (r"\bbi-?bas(?:al|ilar)\b", "both lower zones"),
    # "apical zone" is the upper zone, not the "upper zone zone"
    (r"\b(?:basal|basilar) (?:zones|lobes)\b", "lower zones"),
    (r"\b(?:basal|basilar|bases|base)(?: (?:zone|lobe))?\b", "lower zone"),
    (r"\bapical (?:zones|lobes)\b", "upper zones"),
    (r"\b(?:apical|apices|apex)(?: (?:zone|lobe))?\b", "upper zone"),
    (r"\blobes\b", "zones"),
    (r"\blobe\b", "zone"),
    (r"\bmid[- ]?zones\b", "middle zones"),
    (r"\bmid[- ]?zone\b", "middle zone"),
    (r"\bmid[- ]", "middle "),
    (r"\bmid\b", "middle"),
    (r"\bright[- ]?(?:sided|hand)\b", "right"),
    (r"\bleft[- ]?(?:sided|hand)\b", "left"),
    (r"\brt\b", "right"),
    (r"\blt\b", "left"),
    (r"\bboth sides\b", "both lungs"),
    (r"\bbilaterally\b", "bilateral"),
    # Fleischner glossary findings of the airspace (and COVID-19 reporting) -> "infection"
    (r"\b(?:air[- ]?space|alveolar) (?:opacification|filling|consolidation)\b", "infection"),
    (r"\bair[- ]?space\b", "infection"),
    (r"\b(?:opacified|consolidated|pneumonic|bronchopneumonia)\b", "infection"),
    (r"\b(?:sars[- ]?cov[- ]?2|coronavirus)\b", "covid-19"),
    (r"\binfection infection\b", "infection"),
    # descriptors of extent, density and distribution that do not change the target
    (
        r"\b(?:peripheral|perihilar|central|dense|confluent|extensive|mild|moderate|severe"
        r"|marked|minimal|focal|multiple|widespread|predominantly|predominant|mainly|mostly"
        r"|new|increased|involving|affecting|within|throughout|distribution|predominance"
        r"|changes?|solitary|single|spiculated|well-defined|rounded|alveolar)\b",
        " ",
    ),
)

#: Words that ask rather than describe, and the picture a request is asked of: every domain.
_REQUEST_RULES: tuple[tuple[str, str], ...] = (
    (r"\b(?:where|which) (?:is|are)\b", " "),
    (r"\b(?:can|could|would) you\b", " "),
    (
        r"\b(?:please|segment|outline|delineate|highlight|show|find|mark|locate|display|identify"
        r"|detect|label|annotate|indicate|draw|me)\b",
        " ",
    ),
    (
        r"\b(?:on|in|of) (?:this|the) (?:chest |brain |head |axial |flair |mr |mri )?(?:image"
        r"|radiograph|x-?ray|film|scan|cxr|picture|mri|mr|slice|section|sequence|study)\b",
        " ",
    ),
    (r"\b(?:patchy|hazy|diffuse|subtle|faint|multifocal|scattered|ill-defined)\b", " "),
)

#: Neuroradiology report wording folded onto the words of the brain-MRI training texts
#: ("FLAIR hyperintense lesion in the left hemisphere"): sequence names, signal words, what the
#: lesion is called, and places named by lobe, side or midline.
_BRAIN_RULES: tuple[tuple[str, str], ...] = (
    # sequence: T2-weighted FLAIR, T2/FLAIR, T2w, fluid-attenuated inversion recovery -> flair
    (r"\bfluid[- ]attenuated inversion[- ]recovery\b", "flair"),
    (r"\bt2[- ]?(?:weighted|w)?[- /]*flair\b", "flair"),
    (r"\bt2[- ]?(?:weighted|w)\b", "flair"),
    (r"\bt2\b", "flair"),
    # signal: hyperintensity, high/increased/bright/abnormal signal, signal abnormality
    (r"\bsignal abnormalit(?:y|ies)\b", "hyperintense lesion"),
    (r"\bhyper-?intensit(?:y|ies)\b", "hyperintense lesion"),
    (
        r"\b(?:high|bright|increased|elevated|abnormal|abnormally high) flair signal"
        r"(?: intensity| change| changes)?\b",
        "flair hyperintense",
    ),
    (
        r"\b(?:high|bright|increased|elevated|abnormal|abnormally high) signal"
        r"(?: intensity| change| changes)?\b",
        "hyperintense",
    ),
    (r"\bhyper-?intense\b", "hyperintense"),
    (r"\bhyperintense(?: hyperintense)+\b", "hyperintense"),
    (r"\bflair(?:[ /]+flair)+\b", "flair"),
    # what the lesion is called
    (
        r"\b(?:(?:low|lower)[- ]grade |diffuse |infiltrative |infiltrating )?(?:gliomas?"
        r"|astrocytomas?|oligodendrogliomas?|oligoastrocytomas?|tumou?r burden|tumou?rs?"
        r"|neoplasms?|neoplasia|masses|mass|lesions|abnormalit(?:y|ies)|o?edema|growths?)\b",
        "lesion",
    ),
    (r"\b(?:infiltrative|infiltrating|expansile|non-?enhancing)\b", " "),
    # places: lobes and regions name a side's hemisphere; both sides, the midline
    (
        r"\b(?:fronto-?parietal|parieto-?occipital|temporo-?parietal|fronto-?temporal"
        r"|temporo-?occipital|frontal|temporal|parietal|occipital|insular|insula)"
        r"(?: lobes?| regions?| cortex| white matter| areas?)?\b",
        "hemisphere",
    ),
    (r"\bhemispheric\b", "hemisphere"),
    (r"\b(?:cerebral )?hemispheres\b", "hemispheres"),
    (r"\bcerebral hemisphere\b", "hemisphere"),
    (r"\b(?:side|half) of the (?:brain|head)\b", "hemisphere"),
    (r"\bright[- ]?(?:sided|hand)\b", "right"),
    (r"\bleft[- ]?(?:sided|hand)\b", "left"),
    (r"\b(?:bilateral|bilaterally|bihemispheric|on both sides|both sides)\b", "both hemispheres"),
    (r"\b(?:crossing|across|through|involving) the midline\b", "both hemispheres"),
    (r"\b(?:in|of|within) the brain\b", " "),
    (r"\b(?:brain|cerebral|supratentorial|white matter|subcortical|cortical)\b", " "),
    # size
    (r"\b(?:big|sizeable|sizable|extensive|bulky)\b", "large"),
    (
        r"\b(?:moderate|moderate[- ]sized|moderately sized|mid[- ]sized|intermediate)\b",
        "medium-sized",
    ),
    (r"\b(?:tiny|little|minor)\b", "small"),
)

SYNONYM_RULES: tuple[tuple[str, str], ...] = _CHEST_RULES + _REQUEST_RULES
"""The chest rule set (radiograph findings, organs, lung zones) and the request words."""
#: Sentence punctuation carries no request in a brain-MRI prompt: "FLAIR hyperintense lesion."
#: and "FLAIR hyperintense lesion" are one question, so a model cannot learn a full stop as
#: "nothing there" (the lgg-flair rows that ask of a slice without lesion all end with one).
_PUNCTUATION_RULES: tuple[tuple[str, str], ...] = ((r"[.,;:!?]+(?=\s|$)", " "),)

BRAIN_SYNONYM_RULES: tuple[tuple[str, str], ...] = (
    _BRAIN_RULES + _REQUEST_RULES + _PUNCTUATION_RULES
)
"""The brain-MRI rule set (sequence, signal, lesion, lobes and sides) and the request words."""
RULE_SETS: dict[str, tuple[tuple[str, str], ...]] = {
    "chest": SYNONYM_RULES,
    "brain": BRAIN_SYNONYM_RULES,
}
_BRAIN_WORDS = re.compile(r"\b(?:hemispheres?|flair|glioma|brain|cerebral|midline)\b", re.I)
_CHEST_WORDS = re.compile(r"\b(?:lungs?|infection|pulmonary|heart|clavicle|nodule|chest)\b", re.I)


def synonym_domain(texts: Iterable[str]) -> str:
    """Which rule set fits a run's training texts: "brain" when brain words outnumber chest
    words in them, else "chest" (the rules fold onto the words these texts use)."""
    brain = chest = 0
    for text in texts:
        brain += len(_BRAIN_WORDS.findall(text))
        chest += len(_CHEST_WORDS.findall(text))
    return "brain" if brain > chest else "chest"


_INF = (
    "infection",
    "opacity",
    "opacities",
    "consolidation",
    "pulmonary infection",
    "infiltrates",
    "airspace disease",
    "pneumonia",
)
_ZONE = {
    "upper": ("upper", "upper", "apical"),
    "middle": ("middle", "mid", "middle"),
    "lower": ("lower", "lower", "basal"),
}


#: Frames around a request: how people ask, and the picture they ask it of. The words that ask
#: are folded away by :data:`SYNONYM_RULES`; the rest ("region", "area", "mask of", "visible")
#: the model learns to read past.
_FRAMES = (
    "{p}",
    "{p}",
    "{p}",
    "{p} on this radiograph",
    "{p} on the chest x-ray",
    "locate the {p}",
    "the {p}, please",
    "mask of the {p}",
    "can you find the {p}",
    "region of the {p}",
    "{p} area",
    "{p}, frontal chest film",
    "visible {p}",
)


def _framed(r: random.Random, text: str) -> str:
    frame = r.choice(_FRAMES)
    if text.split(" ", 1)[0] in ("the", "both", "all", "every", "areas", "bilateral"):
        frame = frame.replace("the {p}", "{p}")  # no "the the left lung", "the both lungs"
    return frame.format(p=text)


def _side_words(side: str) -> tuple[str, ...]:
    return (side, f"{side} side", side)


def _infection_all(r: random.Random) -> str:
    f = r.choice(_INF)
    return r.choice(
        [
            f"{f}",
            f"all {f}",
            f"{f} in the lungs",
            f"lung {f}",
            "all infected areas",
            f"every area of {f}",
            f"{f} in either lung",
            f"segment the {f}",
            f"pulmonary {f}",
            f"areas of {f}",
            f"covid-19 {f}",
        ]
    )


def _infection_sides(r: random.Random, sides: list[str], zone: str) -> str:
    f = r.choice(_INF)
    if len(sides) == 2:
        z = r.choice(_ZONE[zone]) if zone else ""
        if not z:
            return r.choice(
                [f"bilateral {f}", f"{f} in both lungs", f"{f} on both sides", f"{f} bilaterally"]
            )
        return r.choice(
            [
                f"bilateral {z} zone {f}",
                f"{f} in both {z} zones",
                f"{f} in the {z} zones of both lungs",
                f"{z} zone {f} bilaterally",
                f"{f} in the {z} zone on both sides",
                f"{f} in the {z} zones",
            ]
        )
    s = r.choice(_side_words(sides[0]))
    if not zone:
        return r.choice(
            [
                f"{f} in the {sides[0]} lung",
                f"{s} {f}",
                f"{f} on the {sides[0]}",
                f"{sides[0]} lung {f}",
                f"{f} of the {sides[0]} lung",
                f"{f}, {sides[0]} lung",
            ]
        )
    z = r.choice(_ZONE[zone])
    return r.choice(
        [
            f"{f} in the {sides[0]} {z} zone",
            f"{sides[0]} {z} zone {f}",
            f"{f}, {sides[0]} {z} zone",
            f"{f} in the {z} zone of the {sides[0]} lung",
            f"{f} in the {z} {sides[0]} lung",
            f"{z} zone {f} on the {sides[0]}",
        ]
    )


def _lung(r: random.Random, which: str) -> str:
    if which == "both":
        return r.choice(
            [
                "both lungs",
                "lungs",
                "the lungs",
                "lung fields",
                "both lung fields",
                "the lung fields",
                "bilateral lungs",
                "entire lungs",
                "lungs on both sides",
                "the whole of both lungs",
                "right and left lung",
                "pulmonary regions",
            ]
        )
    return r.choice(
        [
            f"{which} lung",
            f"the {which} lung",
            f"{which} lung field",
            f"the {which} hemithorax",
            f"segment the {which} lung",
            f"{which} lung region",
            f"entire {which} lung",
            f"whole {which} lung",
            f"{which} lung outline",
            f"lung, {which} side",
            f"the lung on the {which} side",
            f"{which} pulmonary region",
        ]
    )


def _nodule(r: random.Random, side: str, zone: str) -> str:
    n = r.choice(["nodule", "pulmonary nodule", "lung nodule", "nodular opacity", "mass"])
    if not side:
        return n
    if not zone:
        return r.choice([f"{n} in the {side} lung", f"{side} lung {n}", f"{n}, {side} lung"])
    z = r.choice(_ZONE[zone])
    return r.choice(
        [
            f"{n} in the {side} {z} zone",
            f"{n}, {side} {z} zone",
            f"{n} in the {z} zone of the {side} lung",
            f"{side} {z} zone {n}",
        ]
    )


_LESION = (
    "FLAIR hyperintense lesion",
    "hyperintense lesion",
    "FLAIR hyperintensity",
    "lesion",
    "FLAIR lesion",
    "tumour",
    "glioma",
    "abnormal FLAIR signal",
)
_BRAIN_FRAMES = (
    "{p}",
    "{p}",
    "{p}",
    "{p} on this MRI",
    "{p} on the FLAIR image",
    "locate the {p}",
    "the {p}, please",
    "mask of the {p}",
    "can you find the {p}",
    "region of the {p}",
    "{p} on this slice",
    "visible {p}",
)


def _lesion(r: random.Random, side: str) -> str:
    """A request for the FLAIR lesion (``side``: "left", "right", "both" or "" for any)."""
    les = r.choice(_LESION)
    if side == "both":
        return r.choice([f"{les} in both hemispheres", f"bilateral {les}", f"{les} on both sides"])
    if side:
        return r.choice(
            [
                f"{les} in the {side} hemisphere",
                f"{side} hemisphere {les}",
                f"{les}, {side} hemisphere",
                f"{les} on the {side}",
                f"{side} {les}",
                f"{les} in the {side} cerebral hemisphere",
            ]
        )
    return r.choice([les, f"the {les}", f"any {les}", f"{les} in the brain"])


def side_of(text: str) -> str:
    """The side a sentence names: "both" ("both", "bilateral"), "left" or "right" when it
    names that one alone, else "" (none named, or left and right together). The rewording of
    a brain "none" row keeps the side its sentence names."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    if "both" in words or "bilateral" in words:
        return "both"
    sides = [s for s in ("left", "right") if s in words]
    return sides[0] if len(sides) == 1 else ""


def paraphrase(target: str, rng: random.Random, text: str = "", kind: str = "") -> str | None:
    """Another wording of the request ``target`` (the manifest's fixed grammar), or ``None``
    when the target is not one this module knows. "none" (a finding that is not there) gets a
    request of the row's own domain (``text``, the row's sentence: a brain lesion with the side
    that sentence names, else any infection request): the answer to it is the empty mask. Most
    draws (about three wordings in four) sit in a frame ("locate the ...", "... on this
    radiograph", "... on this MRI"). ``kind`` "describe" marks a request for the whole finding:
    a brain lesion's side is then named in about half of the wordings only (it lies on that side
    whole), so that a request without a side is not learnt as "nothing there"."""
    if synonym_domain([text]) == "brain" or target.strip().lower().startswith("lesion"):
        phrase = _brain_phrase(target, rng, text, whole=kind == "describe")
        if phrase is None:
            return None
        frame = rng.choice(_BRAIN_FRAMES)
        if phrase.split(" ", 1)[0] in ("the", "any", "bilateral"):
            frame = frame.replace("the {p}", "{p}")
        return frame.format(p=phrase)
    phrase = _phrase(target, rng)
    return None if phrase is None else _framed(rng, _one_pulmonary(phrase))


def _one_pulmonary(phrase: str) -> str:
    """No "pulmonary pulmonary infection" or "lung pulmonary infection" where a prefix meets
    a finding word that already says it (the draws stay as they were)."""
    return phrase.replace("pulmonary pulmonary ", "pulmonary ").replace("lung pulmonary ", "lung ")


def _brain_phrase(target: str, rng: random.Random, text: str, whole: bool) -> str | None:
    parts = target.strip().lower().split(":")
    if parts[0] == "none":
        return _lesion(rng, side_of(text))
    if parts[0] == "lesion":
        side = parts[1] if len(parts) > 1 and parts[1] in ("left", "right", "both") else ""
        if whole and rng.random() < 0.5:
            side = ""
        return _lesion(rng, side)
    return None


def _phrase(target: str, rng: random.Random) -> str | None:
    t = target.strip().lower()
    if t == "none":
        sides = rng.choice([["left"], ["right"], ["left", "right"], []])
        zone = rng.choice(["", "", "upper", "middle", "lower"])
        return _infection_sides(rng, sides, zone) if sides else _infection_all(rng)
    parts = t.split(":")
    head = parts[0]
    if head == "infection" and len(parts) >= 2:
        if parts[1] == "all":
            return _infection_all(rng)
        sides = [s for s in parts[1].split("+") if s in ("left", "right")]
        zone = parts[2] if len(parts) > 2 and parts[2] in _ZONE else ""
        return _infection_sides(rng, sides, zone) if sides else None
    if head == "lung" and len(parts) == 2 and parts[1] in ("left", "right", "both"):
        return _lung(rng, parts[1])
    if t in ("left_lung", "right_lung"):
        return _lung(rng, t.split("_")[0])
    if t == "heart":
        return rng.choice(
            [
                "heart",
                "the heart",
                "heart contour",
                "heart shadow",
                "cardiac shadow",
                "segment the heart",
                "cardiac contour",
                "heart outline",
                "outline of the heart",
                "the cardiac border",
                "heart area",
                "shadow of the heart",
                "whole heart",
            ]
        )
    if t in ("left_clavicle", "right_clavicle"):
        side = t.split("_")[0]
        return rng.choice(
            [
                f"{side} clavicle",
                f"the {side} clavicle",
                f"{side} collarbone",
                f"clavicle on the {side}",
                f"{side} clavicular bone",
                f"clavicle, {side} side",
                f"{side} clavicle outline",
                f"the {side} collar bone region",
            ]
        )
    if head == "nodule":
        side = parts[1] if len(parts) > 1 and parts[1] in ("left", "right") else ""
        zone = parts[2] if len(parts) > 2 and parts[2] in _ZONE else ""
        return _nodule(rng, side, zone)
    return None


def add_paraphrases(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """``ds`` plus ``n`` reworded copies of every training row that has a known ``target``.

    The copies share image and mask with their row; their ids end in ``~p1`` .. ``~pN``. The
    wording depends only on (seed, row id, copy), so the code cache stays valid between runs.
    Validation and test rows are never reworded (model selection stays on the real texts).
    """
    if n <= 0:
        return ds
    extra: list[Sample] = []
    for s in ds.samples:
        if s.split != "train" or not s.target:
            continue
        for k in range(1, n + 1):
            text = paraphrase(s.target, random.Random(f"{seed}\0{s.id}\0{k}"), s.text, s.kind)
            if text:
                extra.append(dataclasses.replace(s, id=f"{s.id}~p{k}", text=text))
    return dataclasses.replace(ds, samples=ds.samples + extra)


__all__ = [
    "BRAIN_SYNONYM_RULES",
    "RULE_SETS",
    "SYNONYM_RULES",
    "add_paraphrases",
    "paraphrase",
    "side_of",
    "synonym_domain",
]

"""Subject phrases from a caption with spaCy, and where their tokens sit in the SDXL prompt.

MS-Diffusion runs an entity recogniser over captions; on captions spaCy's entities are mostly empty and its noun
chunks break whenever the parser misreads a word (a DreamBooth prompt "a sks can in the jungle" parses "can" as a
modal verb, "a sks stuffed animal" as a clause). So subjects are runs of nominal tokens from the tagger: modifiers
(adjectives, participles like "stuffed", compounds, hyphens, possessives) followed by nouns, with determiners and
numbers left out ("a striped red ball" → "striped red ball"). A verb-tagged word is read as a noun when it sits in a
noun's place (a nominal dependency, or a base-form verb / modal followed by a preposition or the end) and spaCy tags
it as a noun in a neutral frame. Only visual subjects stay: phrases headed by pronouns, by words that name no object
("top", "background", "photo", ...), by non-visual entities (dates, quantities) and settings ("grass" in "on the
grass", "wall" in "in front of a wall") are left out.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Heads that name a position, a picture or a quantity rather than a thing one could photograph on its own.
NON_VISUAL_HEADS = frozenset(
    ["background", "foreground", "top", "bottom", "front", "back", "side", "middle", "center", "centre", "left", "right", "edge", "corner", "view", "photo", "photograph", "picture", "image", "shot", "closeup", "close-up", "style", "color", "colour", "shape", "kind", "type", "sort", "lot", "bunch", "group", "pair", "couple", "number", "set", "way", "time", "day", "night", "morning", "evening", "afternoon", "distance", "air", "light", "shadow", "rendering", "render", "illustration", "drawing", "painting", "artwork", "portrait", "texture", "pattern", "size", "scene", "surface", "area", "part", "piece"]
)
# Heads that are the setting (stuff and places) when they sit in a locative phrase ("on the grass").
SETTING_HEADS = frozenset(
    ["grass", "lawn", "snow", "sand", "sky", "water", "ocean", "sea", "beach", "jungle", "forest", "woods", "field", "meadow", "street", "road", "sidewalk", "floor", "ground", "wall", "room", "city", "town", "desert", "lake", "river", "park", "garden", "kitchen", "table", "rug", "carpet", "fabric", "mirror", "dirt", "mud", "ice", "hill", "mountain", "mountains", "valley", "stage", "studio", "house", "building", "space", "universe", "world", "countryside", "farm", "shore", "pavement", "path", "trail", "cobblestone", "bed", "couch", "sofa", "shelf", "counter", "desk", "window", "background"]
)
LOCATIVE_PREPOSITIONS = frozenset(
    ["in", "on", "at", "under", "over", "across", "through", "inside", "into", "onto", "along", "near", "beside", "by", "behind", "above", "below", "against", "around", "among", "within", "atop", "underneath", "beneath", "outside"]
)
NON_VISUAL_ENTITIES = frozenset({"DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL", "LANGUAGE",
                                 "LAW", "EVENT"})
NOMINAL_DEPS = frozenset({"pobj", "dobj", "nsubj", "nsubjpass", "attr", "appos", "compound", "npadvmod"})
_BOUNDARY_POS = frozenset({"ADP", "CCONJ", "SCONJ", "PUNCT"})


# Short function words of the languages most often found in scraped captions that are no English words: a caption
# holding more of these than English function words is not English (Latin-script languages pass a script check).
FOREIGN_FUNCTION_WORDS = frozenset(
    ["der", "das", "ein", "eine", "einem", "einen", "einer", "und", "mit", "auf", "dem", "des", "im", "ist", "vor",
     "neben", "unter", "zwei", "le", "la", "les", "un", "une", "du", "et", "avec", "sur", "dans", "est", "deux", "el",
     "los", "las", "una", "y", "con", "en", "del", "sobre", "junto", "dos", "il", "lo", "gli", "uno", "di", "della",
     "sul", "nel", "ed", "um", "uma", "os", "com", "em", "ao", "het", "een", "van", "op", "naast", "onder", "och",
     "med", "ett", "på", "og", "af"]
)
ENGLISH_FUNCTION_WORDS = frozenset(
    ["a", "an", "the", "and", "of", "on", "in", "with", "at", "by", "to", "is", "are", "next", "two", "three", "its",
     "his", "her", "their", "under", "over", "near", "from", "for", "some", "this", "that", "behind", "beside"]
)


def unsupported_language(caption: str) -> str | None:
    """Why an English phrase model cannot read ``caption`` (None when it can): mostly non-Latin letters (Chinese,
    Arabic, Cyrillic, ...), or Latin-script words that are more often another language's function words than
    English ones (German, French, Spanish, ...). Without this check such captions become samples whose "phrases"
    are whatever the English tagger made of them (German kept whole, Arabic reduced to an English fragment)."""
    letters = [ch for ch in caption if ch.isalpha()]
    if not letters:
        return None
    latin = sum(ch.isascii() or unicodedata.name(ch, "").startswith("LATIN") for ch in letters)
    if latin / len(letters) < 0.5:
        return f"{len(letters) - latin} of {len(letters)} letters are not Latin script"
    words = re.findall(r"[^\W\d_]+", caption.lower())
    foreign = [w for w in words if w in FOREIGN_FUNCTION_WORDS]
    if len(foreign) > sum(w in ENGLISH_FUNCTION_WORDS for w in words):
        return f"reads as another language than English ({', '.join(dict.fromkeys(foreign))})"
    return None


@dataclass(frozen=True)
class Phrase:
    text: str
    start: int  # character span in the caption
    end: int
    head: str  # the head noun, lower case


def _governing_preposition(token: Any) -> Any:
    """The preposition a noun hangs from, looking through "of" behind a relational noun ("in front of a wall")."""
    head = token.head
    if head.dep_ == "prep" and head.lower_ == "of" and head.head.lower_ in NON_VISUAL_HEADS:
        return _governing_preposition(head.head)
    return head if head.dep_ == "prep" or head.pos_ == "ADP" else None


def _is_setting(root: Any) -> bool:
    prep = _governing_preposition(root)
    return root.lemma_.lower() in SETTING_HEADS and prep is not None and prep.lower_ in LOCATIVE_PREPOSITIONS


class NounLexicon:
    """Whether a word can be a noun, asked of the tagger once per word in a neutral frame ("the X is here")."""

    def __init__(self, nlp: Any) -> None:
        self.nlp = nlp
        self._cache: dict[str, bool] = {}

    def __call__(self, word: str) -> bool:
        word = word.lower()
        if word not in self._cache:
            tagged = self.nlp(f"the {word} is here")
            self._cache[word] = len(tagged) == 4 and tagged[1].tag_ in ("NN", "NNS", "NNP", "NNPS")
        return self._cache[word]


def _is_nominal(token: Any, is_noun: NounLexicon) -> bool:
    if token.pos_ in ("NOUN", "PROPN"):
        return True
    if token.pos_ not in ("VERB", "AUX") or token.tag_ == "VBG":
        return False
    nxt = token.nbor(1) if token.i + 1 < len(token.doc) else None
    in_noun_place = token.dep_ in NOMINAL_DEPS or (
        token.tag_ in ("VB", "MD") and (nxt is None or nxt.pos_ in _BOUNDARY_POS))
    return in_noun_place and is_noun(token.text)


def _runs(doc: Any, is_noun: NounLexicon) -> list[tuple[int, int]]:
    """Token ranges [first, last] of modifier* noun+ runs."""
    nominal = [_is_nominal(t, is_noun) for t in doc]

    def modifier(i: int) -> bool:
        t = doc[i]
        followed = i + 1 < len(doc) and (nominal[i + 1] or doc[i + 1].pos_ == "ADJ" or doc[i + 1].tag_ in ("VBN", "VBD"))
        if t.pos_ == "ADJ" or (t.tag_ in ("VBN", "VBD") and followed):
            return True
        # "t-shirt", "dog's toy": glue inside a run
        return i > 0 and (nominal[i - 1] or doc[i - 1].pos_ == "ADJ") and (
            (t.tag_ == "HYPH" and followed) or t.tag_ == "POS")

    runs, first = [], None
    for i in range(len(doc) + 1):
        inside = i < len(doc) and (nominal[i] or modifier(i))
        if inside and first is None:
            first = i
        if not inside and first is not None:
            last = max((j for j in range(first, i) if nominal[j]), default=None)
            if last is not None:
                runs.append((first, last))
            first = None
    return runs


def _is_subject(head: Any) -> bool:
    if head.lower_ in NON_VISUAL_HEADS or head.lemma_.lower() in NON_VISUAL_HEADS:
        return False
    if head.ent_type_ in NON_VISUAL_ENTITIES:
        return False
    return not _is_setting(head)


def subject_phrases(doc: Any, is_noun: NounLexicon) -> list[Phrase]:
    """Every visual subject phrase of a parsed caption, in caption order (the caller enforces max_subjects)."""
    phrases = []
    for first, last in _runs(doc, is_noun):
        head = doc[last]
        if not _is_subject(head):
            continue
        start, end = doc[first].idx, head.idx + len(head)
        phrases.append(Phrase(doc.text[start:end], start, end, head.lower_))
    return phrases


def extract_phrases(nlp: Any, captions: Sequence[str], is_noun: NounLexicon | None = None) -> list[list[Phrase]]:
    is_noun = is_noun or NounLexicon(nlp)
    return [subject_phrases(doc, is_noun) for doc in nlp.pipe(list(captions))]


def token_positions(tokenizer: Any, caption: str, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices into the prompt's ``input_ids`` (BOS at 0) of each span's tokens; tokens cut by the 77-token limit
    are left out. CLIP's BPE splits words independently, so the tokens of a prefix are a prefix of the tokens."""
    limit = tokenizer.model_max_length - 1  # the last slot holds EOS

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    out = []
    for start, end in spans:
        first, last = 1 + count(caption[:start]), 1 + count(caption[:end])
        out.append([i for i in range(first, last) if i < limit])
    return out

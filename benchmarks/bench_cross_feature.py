"""Which feature L_cross aligns, and whether it matters: the model.align_cross_feature choices on the tiny preset.

    python benchmarks/bench_cross_feature.py [--steps 60] [--images 16] [--config configs/tiny.yaml]

Builds a small dataset with the real builder (no Ray), then for each of ``hidden_state``, ``attn2_output`` and
``image_branch`` prints

- **x_t sensitivity**: the cosine, per tapped layer, between the box-pooled feature of each real subject for pure
  noise at t = 999 and for a zero latent at t = 1 (same conditions). A feature near 1 does not depend on the image
  being denoised, so aligning it to DINOv2 cannot teach the diffusion features anything;
- **training curves**: the same initial adapter trained ``--steps`` steps (alpha from step 0) on the same batches,
  with held-out L_cross, L_diffusion and cos_cross measured with fixed noise and timesteps every few steps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pyarrow.parquet as pq
import torch

from mpalign.config import load_config
from mpalign.data.build import build_dataset
from mpalign.data.collate import rows_to_batch
from mpalign.data.schema import SAMPLES_DIR
from mpalign.models.attention import CROSS_FEATURES, AlignmentRecorder
from mpalign.models.training_module import MPAlignTrainingModule


def batches_of(dataset: Path, cfg, batch_size: int) -> list[dict[str, torch.Tensor]]:
    rows = pq.read_table(dataset / SAMPLES_DIR).sort_by("id").to_pydict()
    count = len(rows["id"])
    return [rows_to_batch({k: v[i:i + batch_size] for k, v in rows.items()}, cfg)
            for i in range(0, count - batch_size + 1, batch_size)]


@torch.no_grad()
def sensitivity(module: MPAlignTrainingModule, batch: dict[str, torch.Tensor]) -> list[float]:
    """Per tapped layer: mean over real subjects of cos(pooled feature | noise at 999, pooled feature | zeros at 1)."""
    cond = module.prepare_conditions(batch)
    latents = cond["latents"]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    pooled = []
    for sample, t in ((noise, 999), (torch.zeros_like(latents), 1)):
        recorder = AlignmentRecorder(blocks=tuple(module.cfg.model.align_blocks),
                                     cross_feature=module.cfg.model.align_cross_feature)
        module.denoise(cond, sample, torch.full((len(latents),), t), recorder)
        pooled.append([p for _, p in recorder.cross])
    real = cond["subject_mask"]
    return [float(torch.nn.functional.cosine_similarity(a, b, dim=-1)[real].mean()) for a, b in zip(*pooled)]


def held_out(module: MPAlignTrainingModule, batches: list[dict[str, torch.Tensor]], step: int) -> dict[str, float]:
    outs = [module.validation_losses(b, step, seed=i) for i, b in enumerate(batches)]
    return {k: sum(float(o[k]) for o in outs) / len(outs) for k in ("cross", "cos_cross", "diffusion")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mpalign-bench-cross-") as work:
        dataset = Path(work) / "dataset"
        base = [f"data.sample.num_images={args.images}", "data.sample.num_videos=0", f"data.path={dataset}",
                "train.warmup_steps=0", "train.lr=1e-3"]
        build_dataset(load_config(args.config, base), output=str(dataset), executor="local", log=lambda _: None)
        for feature in CROSS_FEATURES:
            cfg = load_config(args.config, [*base, f"model.align_cross_feature={feature}"])
            module = MPAlignTrainingModule.from_config(cfg, device="cpu")
            batches = batches_of(dataset, cfg, batch_size=4)
            train, val = batches[:-1], batches[-1:]
            cosines = sensitivity(module, val[0])
            print(f"{feature}: x_t sensitivity cos(noise@999, zeros@1) per layer "
                  f"{[round(c, 3) for c in cosines]} mean {sum(cosines) / len(cosines):.3f}")
            optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=cfg.train.lr)
            generator = torch.Generator().manual_seed(0)
            module.train()
            for step in range(args.steps + 1):
                if step % args.every == 0:
                    m = held_out(module, val, step)
                    print(f"  step {step:4d}  val L_cross {m['cross']:.4f}  cos_cross {m['cos_cross']:.4f}  "
                          f"L_diffusion {m['diffusion']:.4f}")
                if step == args.steps:
                    break
                optimizer.zero_grad()
                module(train[step % len(train)], step, generator=generator)["loss"].backward()
                torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), cfg.train.max_grad_norm)
                optimizer.step()


if __name__ == "__main__":
    main()

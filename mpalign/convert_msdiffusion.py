"""Import the official MS-Diffusion checkpoint (``ms_adapter.bin``) as an mpalign adapter folder.

    python -m mpalign.convert_msdiffusion ms_adapter.bin OUT_DIR [--dim-head 64] [--fourier-freqs 8] [--max-subjects 4]

The checkpoint is a dict: ``image_proj`` (the resampler's state dict, loaded as is), ``ms_adapter`` (a list over
ALL the UNet's attention processors, weights ``{k}.to_k_ip.weight``/``{k}.to_v_ip.weight`` at the odd positions k,
the cross-attention layers; self and cross alternate in SDXL's transformer blocks) and ``dummy_image_tokens``.
Sizes are read from the tensor shapes; the three options are what shapes cannot tell (official values by default).
Every key and shape is checked; a missing, unexpected or mis-shaped tensor is reported by its official name.
``OUT_DIR`` is then loaded with ``--adapter OUT_DIR`` / ``from_pretrained`` and holds exactly the official values.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import torch

from mpalign.cli import USER_ERRORS, check_writable, one_line
from mpalign.models.adapter import MSAdapter

OFFICIAL_ENTRIES = ("image_proj", "ms_adapter", "dummy_image_tokens")


class ConversionError(ValueError):
    """The checkpoint does not have the official layout; the message names the offending key."""


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"checkpoint '{path}' is a folder; give the official ms_adapter.bin file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.stat().st_size == 0:
        raise ConversionError(f"checkpoint '{path}' is empty")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        # a text file, a truncated download, a safetensors file: torch.load fails with whichever of these it meets
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"'{path}' is not a readable torch checkpoint: {first_line}") from None
    if not isinstance(ckpt, dict):
        raise ConversionError(f"'{path}' holds a {type(ckpt).__name__}, expected a dict with {list(OFFICIAL_ENTRIES)}")
    missing = [k for k in OFFICIAL_ENTRIES if k not in ckpt]
    if missing:
        raise ConversionError(f"checkpoint has no {missing} (its entries: {sorted(map(str, ckpt))}); expected "
                              f"{list(OFFICIAL_ENTRIES)}")
    for entry in ("image_proj", "ms_adapter"):
        tensors = ckpt[entry]
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ConversionError(f"checkpoint entry '{entry}' must be a state dict (names -> tensors), got "
                                  f"{type(tensors).__name__}")
    return ckpt


def _get(ckpt: dict, entry: str, key: str) -> torch.Tensor:
    if key not in ckpt[entry]:
        raise ConversionError(f"missing key {entry}.{key}")
    return ckpt[entry][key]


def infer_config(ckpt: dict, dim_head: int = 64, fourier_freqs: int = 8, max_subjects: int = 4) -> dict:
    """The ``MSAdapter`` config the checkpoint's shapes imply."""
    for option, value in (("--dim-head", dim_head), ("--fourier-freqs", fourier_freqs), ("--max-subjects", max_subjects)):
        if value < 1:
            raise ConversionError(f"{option} must be at least 1, got {value}")
    proj_in = _get(ckpt, "image_proj", "proj_in.weight")
    grounding = _get(ckpt, "image_proj", "grounding_latents")
    dim = proj_in.shape[0]
    to_q = _get(ckpt, "image_proj", "layers.0.0.to_q.weight")
    if to_q.shape[0] % dim_head:
        raise ConversionError(f"image_proj.layers.0.0.to_q.weight has {to_q.shape[0]} outputs, not a multiple of "
                              f"--dim-head {dim_head}")
    phrase_dim = _get(ckpt, "image_proj", "latent_proj.0.weight").shape[1] - 8 * fourier_freqs
    if phrase_dim <= 0:
        raise ConversionError(f"image_proj.latent_proj.0.weight is too narrow for {fourier_freqs} Fourier frequencies")
    depth = 1 + max(int(m.group(1)) for k in ckpt["image_proj"] if (m := re.match(r"layers\.(\d+)\.", k)))
    dummy = ckpt["dummy_image_tokens"]
    if not isinstance(dummy, torch.Tensor) or dummy.ndim != 3:
        raise ConversionError(f"dummy_image_tokens must be a (1, D, C) tensor, got {getattr(dummy, 'shape', dummy)}")
    return {
        "ip_layer_widths": _ip_layer_widths(ckpt["ms_adapter"]), "cross_attention_dim": int(dummy.shape[2]),
        "image_embed_dim": int(proj_in.shape[1]), "phrase_dim": int(phrase_dim), "max_subjects": max_subjects,
        "num_tokens": int(grounding.shape[1]), "num_dummy_tokens": int(dummy.shape[1]), "resampler_dim": int(dim),
        "resampler_depth": depth, "resampler_heads": to_q.shape[0] // dim_head, "resampler_dim_head": dim_head,
        "resampler_ff_mult": _get(ckpt, "image_proj", "layers.0.1.1.weight").shape[0] // dim,
        "fourier_freqs": fourier_freqs,
    }


def _ip_layer_widths(ms_adapter: dict) -> list[int]:
    positions = {}
    for key, value in ms_adapter.items():
        m = re.fullmatch(r"(\d+)\.(to_k_ip|to_v_ip)\.weight", key)
        if m is None or int(m.group(1)) % 2 == 0:
            raise ConversionError(f"unexpected key ms_adapter.{key} (only odd processor positions, the cross-attention "
                                  "layers, hold to_k_ip/to_v_ip weights)")
        positions.setdefault(int(m.group(1)), value.shape[0])
    if not positions:
        raise ConversionError("ms_adapter holds no to_k_ip/to_v_ip weights")
    widths = []
    for k in range(1, max(positions) + 1, 2):
        if k not in positions:
            raise ConversionError(f"missing key ms_adapter.{k}.to_k_ip.weight")
        widths.append(int(positions[k]))
    return widths


def official_to_adapter_keys(ckpt: dict) -> dict[str, str]:
    """Official name (``entry.key``) -> ``MSAdapter`` state-dict key, for every tensor in the checkpoint."""
    names = {f"image_proj.{k}": f"resampler.{k}" for k in ckpt["image_proj"]}
    for key in ckpt["ms_adapter"]:
        position, rest = key.split(".", 1)
        names[f"ms_adapter.{key}"] = f"ip_layers.{(int(position) - 1) // 2}.{rest}"
    names["dummy_image_tokens"] = "dummy_tokens"
    return names


def _tensor(ckpt: dict, official: str) -> torch.Tensor:
    if official == "dummy_image_tokens":
        return ckpt["dummy_image_tokens"]
    entry, key = official.split(".", 1)
    return ckpt[entry][key]


def convert_checkpoint(ckpt: dict, dim_head: int = 64, fourier_freqs: int = 8, max_subjects: int = 4) -> MSAdapter:
    """An ``MSAdapter`` holding the checkpoint's tensors (same values, same dtype), after strict key/shape checks."""
    config = infer_config(ckpt, dim_head, fourier_freqs, max_subjects)
    with torch.device("meta"):
        adapter = MSAdapter(**config)
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    names = official_to_adapter_keys(ckpt)
    ours_to_official = {ours: official for official, ours in names.items()}
    official_name = {ours: ours_to_official.get(ours, ours) for ours in expected}
    unexpected = sorted(official for official, ours in names.items() if ours not in expected)
    if unexpected:
        raise ConversionError(f"unexpected key(s) {', '.join(unexpected)}")
    missing = sorted(_official_guess(ours) for ours in expected if ours not in ours_to_official)
    if missing:
        raise ConversionError(f"missing key(s) {', '.join(missing)}")
    for ours, shape in expected.items():
        got = tuple(_tensor(ckpt, official_name[ours]).shape)
        if got != shape:
            raise ConversionError(f"{official_name[ours]} has shape {got}, expected {shape}")
    state = {ours: _tensor(ckpt, official).contiguous() for official, ours in names.items()}
    adapter.load_state_dict(state, strict=True, assign=True)
    return adapter


def _official_guess(ours: str) -> str:
    """The official name of one of our keys, for reporting a key the checkpoint lacks."""
    if ours.startswith("resampler."):
        return "image_proj." + ours[len("resampler."):]
    if ours == "dummy_tokens":
        return "dummy_image_tokens"
    _, index, rest = ours.split(".", 2)
    return f"ms_adapter.{2 * int(index) + 1}.{rest}"


def convert(checkpoint: str | Path, out_dir: str | Path, dim_head: int = 64, fourier_freqs: int = 8,
            max_subjects: int = 4) -> MSAdapter:
    adapter = convert_checkpoint(read_checkpoint(checkpoint), dim_head, fourier_freqs, max_subjects)
    adapter.save_pretrained(out_dir)
    return adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpalign.convert_msdiffusion", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the official ms_adapter.bin")
    parser.add_argument("out_dir", help="adapter folder to write (config.json + safetensors)")
    parser.add_argument("--dim-head", type=int, default=64, help="resampler attention head width (official: 64)")
    parser.add_argument("--fourier-freqs", type=int, default=8, help="box Fourier frequencies (official: 8)")
    parser.add_argument("--max-subjects", type=int, default=4, help="subject slots (official max_rn: 4)")
    args = parser.parse_args(argv)
    try:
        check_writable(args.out_dir, "OUT_DIR", folder=True)
        adapter = convert(args.checkpoint, args.out_dir, args.dim_head, args.fourier_freqs, args.max_subjects)
    except (ConversionError, *USER_ERRORS) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    c = adapter.config
    print(f"converted {args.checkpoint} -> {args.out_dir}: resampler {c.resampler_dim}-d x{c.resampler_depth} "
          f"({c.resampler_heads} heads), {c.num_tokens} tokens/subject, {c.num_dummy_tokens} dummy tokens, "
          f"{len(c.ip_layer_widths)} cross-attention layers, image features {c.image_embed_dim}-d, "
          f"phrases {c.phrase_dim}-d, tokens {c.cross_attention_dim}-d")
    return 0


if __name__ == "__main__":
    sys.exit(main())

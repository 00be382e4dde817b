"""The toy world: small models of SDXL's (and FLUX's) structure trained by the project on the procedural images of
``mpalign.sample_data``, so that learning is visible and measurable on a CPU.

- ``world``: scenes, subject crops and their exact attributes;
- ``classifier``: the attribute classifier (shape, colour, texture, object present), the exact identity metric;
- ``pretrain``: ``python -m mpalign.toy.pretrain`` trains and writes the shipped weights (``mpalign/toy/weights``);
- ``benchmark``: the ``toy`` evaluation benchmark (held-out identities, kind-only prompts, preset boxes) and its
  identity scores;
- ``experiment``: ``python -m mpalign.toy.experiment``, untrained vs trained adapters, alignment on and off.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # the shipped toy weights (package data)

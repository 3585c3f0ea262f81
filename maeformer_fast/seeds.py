"""Seeds that survive resuming: derived from the run seed, rank, step and purpose, not drawn in order."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, rank, step, purpose), stable across processes."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_generator(device: torch.device, *parts: object) -> torch.Generator:
    """A generator on ``device`` seeded from ``parts``: per-step randomness that survives resuming."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*parts))
    return generator

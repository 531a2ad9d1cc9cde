"""Shared helpers of the HF parity tests: tiny random transformers models saved to disk, torch <-> numpy."""

from __future__ import annotations

import numpy as np
import torch


def save_tiny(model, tmp_path, name="hf"):
    path = tmp_path / name
    model.save_pretrained(path)
    return str(path)


def hf_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)), **kwargs).logits.float().numpy()


def assert_logits_close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(ours - ref).max())
    assert err <= rel * scale, f"max abs logit error {err:.3e} > {rel:.0e} x logit scale {scale:.3e}"


def random_ids(vocab, shape, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def randomize_norms(model, seed=0):
    """HF initialises norm weights to constants; random values make the parity tests see weight-handling bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("dt_bias") or name.endswith("A_log"):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    return model

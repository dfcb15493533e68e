"""The KL divergence every part of quantize computes (evaluation, the budgeted mix's sensitivity probe): one
definition, at the lowest stage, so methods/ and measure/ share it."""

from __future__ import annotations

import torch


def kl_divergence(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P_base ‖ P) per position, [n], from log-probabilities [n, vocab], in their precision (no cut-off)."""
    return (base_logp.exp() * (base_logp - logp)).sum(-1)

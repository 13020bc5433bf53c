"""Losses: the adversarial loss of both papers and CUT's PatchNCE loss.

- GANLoss: CycleGAN Eq. 1 (arXiv 1703.10593) and CUT Eq. 1 (arXiv 2007.15651). Both official
  codes replace the log-likelihood objective with least squares (LSGAN, Mao et al. 2017),
  which trains more stably; `vanilla` keeps the paper's log-likelihood form.
- PatchNCELoss: CUT Eq. 2 (the InfoNCE term l(v, v+, v-)) averaged over patches (Eq. 3).

Mirrors models/networks.py (GANLoss) and models/patchnce.py of taesungp/contrastive-unpaired-translation.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import full_precision

GAN_MODES = ("lsgan", "vanilla", "nonsaturating")


class GANLoss(nn.Module):
    """loss(prediction, target_is_real) -> scalar, for a discriminator's logit map (B, 1, h, w).

    The adversarial loss of Eq. 1 in both papers, in the form the official codes train with.

    lsgan: mean (D - label)^2. vanilla: binary cross-entropy on logits. nonsaturating:
    softplus(-D) for real targets, softplus(D) for fake ones (the same as vanilla at labels 1/0).
    `real_label` < 1 is one-sided label smoothing (Salimans et al. 2016).
    """

    def __init__(self, mode: str = "lsgan", real_label: float = 1.0, fake_label: float = 0.0):
        super().__init__()
        if mode not in GAN_MODES:
            raise ValueError(f"unknown GAN mode {mode!r}: use one of {', '.join(GAN_MODES)}")
        if mode == "nonsaturating" and (real_label, fake_label) != (1.0, 0.0):
            raise ValueError("the nonsaturating GAN loss has no labels to smooth: use lsgan or vanilla")
        self.mode, self.real_label, self.fake_label = mode, real_label, fake_label

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        if self.mode == "nonsaturating":
            return F.softplus(-prediction if target_is_real else prediction).mean()
        target = torch.full_like(prediction, self.real_label if target_is_real else self.fake_label)
        if self.mode == "lsgan":
            return F.mse_loss(prediction, target)
        return F.binary_cross_entropy_with_logits(prediction, target)


class PatchNCELoss(nn.Module):
    """loss(feat_q, feat_k) -> scalar; feat_q, feat_k: (B, P, C), L2-normalised.

    Query q_i (a patch of the output) should match key k_i (the same place in the input)
    rather than the P-1 other keys k_j of the same image (the CUT default: negatives from
    the image itself, not the batch). Keys are detached, as officially.
    """

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NCE temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, feat_q: torch.Tensor, feat_k: torch.Tensor) -> torch.Tensor:
        # In fp32 under any autocast: fp16 similarities / 0.07 overflow the scaled gradients.
        with torch.autocast(feat_q.device.type, enabled=False):
            feat_q, feat_k = full_precision(feat_q), full_precision(feat_k.detach())
            B, P, _ = feat_q.shape
            l_pos = (feat_q * feat_k).sum(-1, keepdim=True)  # (B, P, 1): v . v+
            l_neg = feat_q @ feat_k.transpose(1, 2)  # (B, P, P): v . v-, row i against every key
            # The diagonal is the positive again: the official code fills it with -10 (exp(-10/0.07)
            # is 0 in float32) rather than dropping it; we do the same so the numbers agree.
            eye = torch.eye(P, dtype=torch.bool, device=feat_q.device)
            l_neg = l_neg.masked_fill(eye, -10.0)
            logits = torch.cat([l_pos, l_neg], dim=-1) / self.temperature  # (B, P, 1 + P)
            # Eq. 2: l(v, v+, v-) = -log softmax(logits)[positive]; Eq. 3: mean over the B*P patches.
            target = torch.zeros(B * P, dtype=torch.long, device=feat_q.device)
            return F.cross_entropy(logits.flatten(0, 1), target)

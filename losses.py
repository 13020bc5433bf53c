"""Losses: the adversarial loss of both papers (Eq. 1 of CycleGAN, arXiv 1703.10593, and of CUT, arXiv 2007.15651)
and CUT's PatchNCE loss (its Eq. 2). Mirrors models/networks.py (GANLoss) and models/patchnce.py of
taesungp/contrastive-unpaired-translation.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import full_precision

GAN_MODES = ("lsgan", "vanilla", "nonsaturating")


class GANLoss(nn.Module):
    """loss(prediction, target_is_real) -> scalar, for a discriminator's logit map (B, 1, h, w): Eq. 1 of both
    papers as they train it. Both write Eq. 1 as the log-likelihood and train with least squares (CycleGAN Sec. 4,
    CUT's training details; LSGAN, Mao et al. 2017), both official codes' default.

    lsgan: mean (D - label)^2. vanilla: binary cross-entropy on logits, Eq. 1's log-likelihood for D; G, told
    "real" for its fakes, minimises the non-saturating -log D(G(x)), not Eq. 1's log(1 - D(G(x))). nonsaturating:
    softplus(-D) for real targets, softplus(D) for fake ones, vanilla at labels 1/0 (the official CUT code's name).
    `real_label` < 1 is one-sided label smoothing (Salimans et al. 2016).
    """

    def __init__(self, mode: str = "lsgan", real_label: float = 1.0, fake_label: float = 0.0):
        super().__init__()
        if mode not in GAN_MODES:
            raise ValueError(f"unknown GAN mode {mode!r}: use one of {', '.join(GAN_MODES)}")
        if mode == "nonsaturating" and (real_label, fake_label) != (1.0, 0.0):
            raise ValueError("the nonsaturating GAN loss has no labels to smooth: use lsgan or vanilla")
        if not fake_label < real_label <= 1:  # above 1, vanilla has no minimum; D's verdicts read 1 as real
            raise ValueError(f"real_label {real_label} is outside ({fake_label}, 1]: use 1, or a little less to "
                             f"smooth it")
        self.mode, self.real_label, self.fake_label = mode, real_label, fake_label

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        if self.mode == "nonsaturating":
            return F.softplus(-prediction if target_is_real else prediction).mean()
        target = torch.full_like(prediction, self.real_label if target_is_real else self.fake_label)
        if self.mode == "lsgan":
            return F.mse_loss(prediction, target)
        return F.binary_cross_entropy_with_logits(prediction, target)

    def verdict(self, prediction: torch.Tensor) -> torch.Tensor:
        """D's output read as a verdict, 1 real and 0 fake: LSGAN's output itself, which its loss pulls to those
        labels; for the log-likelihood modes the probability of real. Neither network wins at 0.5."""
        return prediction if self.mode == "lsgan" else torch.sigmoid(prediction)


# Where PatchNCE draws a query's negatives from: its own image (CUT's internal negatives), the batch, the other images.
NEGATIVES = ("image", "batch", "others")


class PatchNCELoss(nn.Module):
    """loss(feat_q, feat_k) -> scalar; feat_q, feat_k: (B, P, C), L2-normalised. Eq. 2, averaged over the queries.

    Query q_i (a patch of the output) should match key k_i (the same place in the input) rather than the
    negatives: 'image', the other P-1 patches of its image (internal negatives, the CUT default); 'batch', every
    other patch of the batch (the official --nce_includes_all_negatives_from_minibatch); 'others', the other
    images' patches only (B >= 2; no official switch). Neither is the paper's memory-bank ablation. Keys are
    detached, as officially.
    """

    def __init__(self, temperature: float = 0.07, negatives: str = "image"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NCE temperature must be > 0, got {temperature}")
        if negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives {negatives!r}: use one of {', '.join(NEGATIVES)}")
        self.temperature, self.negatives = temperature, negatives

    def forward(self, feat_q: torch.Tensor, feat_k: torch.Tensor) -> torch.Tensor:
        # In fp32 under any autocast: fp16 similarities / 0.07 overflow the scaled gradients.
        with torch.autocast(feat_q.device.type, enabled=False):
            q, k = full_precision(feat_q), full_precision(feat_k.detach())
            B, P, _ = q.shape
            if self.negatives == "others" and B < 2:
                raise ValueError("negatives from the other images need a batch of 2 or more: raise --batch-size")
            l_pos = (q * k).sum(-1).reshape(B * P, 1)  # (B*P, 1): v . v+
            if self.negatives != "image":  # one pool of keys: the B*P patches of the batch, image by image
                q, k = q.reshape(1, B * P, -1), k.reshape(1, B * P, -1)
            l_neg = q @ k.transpose(1, 2)  # (B, P, P), or (1, B*P, B*P): query i against every key
            # The diagonal is the positive again: filled with -10 (exp(-10/0.07) is 0 in float32), as officially,
            # so the numbers agree; 'others' fills the query's whole image so.
            n = l_neg.shape[-1]
            same = torch.eye(n if self.negatives != "others" else B, dtype=torch.bool, device=q.device)
            if self.negatives == "others":
                same = same.repeat_interleave(P, 0).repeat_interleave(P, 1)  # (B*P, B*P) blocks of one image
            logits = torch.cat([l_pos, l_neg.masked_fill(same, -10.0).reshape(B * P, n)], -1) / self.temperature
            # Eq. 2: l(v, v+, v-) = -log softmax(logits)[positive], the positive at index 0. Eq. 3 sums it over
            # places and layers; the official code averages (here over the B*P queries, in CUT.patch_nce over the
            # layers), 1280 times smaller at 256 places x 5 layers: hence lambda_NCE 1 (CUT) or 10 (FastCUT).
            target = torch.zeros(B * P, dtype=torch.long, device=q.device)
            return F.cross_entropy(logits, target)

"""Training objectives: each is a module whose ``forward(batch)`` returns its named losses and their total.

The training loop only reads ``losses["loss"]`` (the total) and logs every entry as ``train/<name>``, so an
objective reports its parts as ``loss_<part>`` and any diagnostics under other names. Every objective offers
``encode_image`` (L2-normalised, from every patch) and ``encode_text``, which raises ``NotImplementedError``
for the objectives without a joint embedding space (mae, m3ae).

All objectives share one backbone, our ViT tower, so that the study compares objectives and poolings and not
architectures. ``clip``/``flip`` and the CLIP part of ``maeclip`` are ``ClipObjective``; MAE-CLIP lives in
``trainer.models.maeclip``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.models.decoders import MaskedDecoder
from trainer.models.joint import JointEncoder
from trainer.models.losses import clip_loss, masked_patch_loss, masked_token_loss, pixel_target
from trainer.models.masking import masked_positions, random_keep_indices, text_keep_indices, valid_tokens
from trainer.models.text import TextTransformer
from trainer.models.vit import VisionTransformer


def vision_tower(cfg: ModelConfig, projected: bool) -> VisionTransformer:
    """The image tower of ``cfg``; ``projected=False`` leaves out the projection to the joint embedding."""
    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.vision_width,
        layers=cfg.vision_layers,
        heads=cfg.vision_heads,
        mlp_ratio=cfg.mlp_ratio,
        embed_dim=cfg.embed_dim if projected else None,
        pool=cfg.image_pool,
        pos_embed=cfg.pos_embed,
        map_heads=cfg.map_heads,
        quick_gelu=cfg.quick_gelu,
    )


def masked_decoder(cfg: ModelConfig, text_length: int = 0, vocab_size: int = 0) -> MaskedDecoder:
    return MaskedDecoder(
        width=cfg.decoder_width,
        layers=cfg.decoder_layers,
        heads=cfg.decoder_heads,
        mlp_ratio=cfg.mlp_ratio,
        grid=cfg.image_size // cfg.patch_size,
        patch_dim=cfg.patch_size**2 * 3,
        text_length=text_length,
        vocab_size=vocab_size,
    )


def pixel_loss(
    cfg: ModelConfig, pixels: torch.Tensor, images: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """MAE's loss on the patches that ``keep`` dropped."""
    target = pixel_target(images, cfg.patch_size, cfg.norm_pix_loss)
    return masked_patch_loss(pixels, target, masked_positions(keep, target.shape[1]))


def token_loss(
    decoder: MaskedDecoder, hidden: torch.Tensor, tokens: torch.Tensor, text_mask: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """M3AE's loss on the masked non-pad caption tokens; the vocabulary head runs on those positions only."""
    keep, _, kept_valid = text_mask
    where = masked_positions(keep, tokens.shape[1], kept_valid) & valid_tokens(tokens)
    return masked_token_loss(decoder.token_head(hidden[where]), tokens, where)


def no_text_embedding(objective: str) -> NotImplementedError:
    return NotImplementedError(
        f"the {objective} objective has no joint image-text embedding, so it has no encode_text; "
        "zero-shot and retrieval evaluations do not apply to it"
    )


class ClipObjective(nn.Module):
    """CLIP, and FLIP when ``cfg.image_mask_ratio`` > 0: two towers trained with the symmetric InfoNCE loss.

    FLIP (Li et al. 2022) drops a random ``image_mask_ratio`` of the patches before the image tower. The
    drop happens only in training mode. ``encode_image`` and evaluation always see every patch, because
    unmasked inference scores higher (FLIP Table 1d, docs/models.md §11).

    ``logit_scale`` stores log(s). It starts at log(``logit_scale_init``) and is capped at
    log(``logit_scale_max``) inside the forward, as AXLearn and FLIP do (docs/models.md §8), so its gradient
    is zero beyond the cap.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mask_ratio = cfg.image_mask_ratio
        self.max_log_scale = math.log(cfg.logit_scale_max)
        self.visual = vision_tower(cfg, projected=True)
        self.text = TextTransformer(
            vocab_size=cfg.vocab_size,
            context_length=cfg.context_length,
            width=cfg.text_width,
            layers=cfg.text_layers,
            heads=cfg.text_heads,
            mlp_ratio=cfg.mlp_ratio,
            embed_dim=cfg.embed_dim,
            pool=cfg.text_pool,
            causal=cfg.text_causal,
            map_heads=cfg.map_heads,
            quick_gelu=cfg.quick_gelu,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, embed_dim) from every patch."""
        return F.normalize(self.visual(images).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings (B, embed_dim)."""
        return F.normalize(self.text(tokens).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit scale s = exp(min(log s, log s_max))."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def output(
        self, image_features: torch.Tensor, text_features: torch.Tensor, split: bool,
        rest: dict[str, torch.Tensor] | None = None, rest_total: torch.Tensor | float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """The objective's losses: contrastive + ``rest_total`` (the weighted other terms, named in ``rest``).

        With ``split`` the contrastive loss is not computed here: the output carries its inputs instead
        (``image_features``, ``text_features``, ``scale``) and the rest as ``loss_rest``, so that a train step
        accumulating micro-batches can compute one contrastive loss over all of them (``trainer.step``).
        """
        scale = self.scale()
        rest = rest or {}
        if split:
            total = torch.as_tensor(rest_total, dtype=torch.float32, device=scale.device)
            return {"image_features": image_features, "text_features": text_features, "scale": scale,
                    "loss_rest": total, **rest}
        contrastive = clip_loss(image_features, text_features, scale)
        return {"loss": contrastive + rest_total, "loss_contrastive": contrastive, **rest,
                "logit_scale": scale.detach()}

    def forward(self, batch: dict[str, torch.Tensor], split: bool = False) -> dict[str, torch.Tensor]:
        images = batch["image"]
        keep_idx = None
        if self.training and self.mask_ratio > 0:
            keep_idx, _ = random_keep_indices(
                images.shape[0], self.visual.num_patches, self.mask_ratio, device=images.device
            )
        image_features = F.normalize(self.visual(images, keep_idx).float(), dim=-1)
        return self.output(image_features, self.encode_text(batch["tokens"]), split)


class MaeObjective(nn.Module):
    """MAE (He et al. 2021): encode a random ``1 − image_mask_ratio`` of the patches, decode every patch, and
    regress the pixels of the masked ones (facebookresearch/mae models_mae.py).

    The encoder is our ViT tower without a projection; ``encode_image`` gives its pooled feature (CLS, GAP or
    MAX; MAP is rejected by the config because no MAE loss would train its head). Masking applies in training
    and evaluation alike, since the loss is only defined on masked patches.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = vision_tower(cfg, projected=False)
        self.decoder_embed = nn.Linear(cfg.vision_width, cfg.decoder_width)
        self.decoder = masked_decoder(cfg)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled encoder features (B, vision_width) from every patch."""
        return F.normalize(self.visual(images).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise no_text_embedding("mae")

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        keep, restore = random_keep_indices(
            images.shape[0], self.visual.num_patches, self.cfg.image_mask_ratio, device=images.device
        )
        latent = self.visual.forward_tokens(images, keep)
        pixels, _ = self.decoder(self.decoder_embed(latent), restore)
        loss = pixel_loss(self.cfg, pixels, images, keep)
        return {"loss": loss, "loss_pixel": loss}


class M3aeObjective(nn.Module):
    """M3AE (Geng et al. 2022): one joint encoder over the visible patches and the visible caption tokens, one
    decoder that reconstructs the masked pixels and the masked non-pad tokens.

    Total = ``image_loss_weight`` · pixel + ``text_loss_weight`` · token (M3AE README: 1.0 and 0.5). As in
    M3AE, one ``decoder_embed`` projects the joint sequence. With ``text_mask_ratio`` 0 the caption is
    context only and there is no token loss. ``encode_image`` runs the joint encoder on the image alone.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = JointEncoder(vision_tower(cfg, projected=False), cfg.vocab_size, cfg.context_length,
                                    cfg.pos_embed)
        self.decoder_embed = nn.Linear(cfg.vision_width, cfg.decoder_width)
        vocab = cfg.vocab_size if cfg.text_mask_ratio > 0 else 0
        self.decoder = masked_decoder(cfg, cfg.context_length, vocab)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled joint-encoder features (B, vision_width) of the image alone, every patch."""
        return F.normalize(self.encoder.visual.pool_tokens(self.encoder(images)).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise no_text_embedding("m3ae")

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, tokens = batch["image"], batch["tokens"]
        num_patches = self.encoder.visual.num_patches
        keep, restore = random_keep_indices(
            images.shape[0], num_patches, self.cfg.image_mask_ratio, device=images.device
        )
        ratio = self.cfg.text_mask_ratio
        text_mask = text_keep_indices(tokens, ratio) if ratio > 0 else None
        text_keep, text_restore, kept_valid = text_mask or (None, None, None)
        encoded = self.decoder_embed(self.encoder(images, keep, tokens, text_keep, kept_valid))
        image_len = 1 + keep.shape[1]
        pixels, hidden = self.decoder(
            encoded[:, :image_len],
            restore,
            encoded[:, image_len:],
            valid_tokens(tokens),
            text_restore,
            kept_valid,
        )
        losses = {"loss_pixel": pixel_loss(self.cfg, pixels, images, keep)}
        total = self.cfg.image_loss_weight * losses["loss_pixel"]
        if text_mask is not None:
            losses["loss_token"] = token_loss(self.decoder, hidden, tokens, text_mask)
            total = total + self.cfg.text_loss_weight * losses["loss_token"]
        return {"loss": total, **losses}

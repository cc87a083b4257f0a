"""Weights in and out of open_clip's ``CLIP`` layout (mlfoundations/open_clip, ``model.py`` /
``transformer.py``), for the ViT CLIPs whose towers are ours: pre-norm blocks, class token, learned
positions, ``ln_pre``, CLS (``pool_type='tok'``) image pooling and argmax (EOT) text pooling, causal text.

Our towers were laid out after open_clip's, so the mapping is renames plus two transposes (see the module
docstrings of ``vit`` and ``text``):
- ``visual.blocks.i`` ↔ ``visual.transformer.resblocks.i``, ``text.blocks.i`` ↔
  ``transformer.resblocks.i``; inside a block ``attn.in_proj.weight``/``.bias`` ↔
  ``attn.in_proj_weight``/``_bias``.
- The text tower's own parts sit at open_clip's top level: ``token_embedding``, ``positional_embedding``,
  ``ln_final``.
- ``visual.proj.weight`` and ``text.proj.weight`` are open_clip's ``visual.proj`` and ``text_projection``
  transposed: open_clip multiplies ``x @ proj``, our ``nn.Linear`` computes ``x @ weight.T``.

Use: load open_clip checkpoints (``open_clip.create_model(name, pretrained=...).state_dict()``) into our
trainer and evaluators, and export our CLIP towers for open_clip's tooling.
"""

from __future__ import annotations

import torch

from trainer.config import ModelConfig
from trainer.models.objectives import ClipObjective

# open_clip's default attention head width: ``CLIPVisionCfg.head_width = 64``, and the text configs of its ViT
# CLIPs give heads = width / 64 too (ViT-B: 512 → 8, ViT-L-14: 768 → 12, ViT-H-14: 1024 → 16).
HEAD_WIDTH = 64

_RENAMES = {
    "visual.patch_embed.weight": "visual.conv1.weight",
    "visual.cls_token": "visual.class_embedding",
    "visual.pos_embed": "visual.positional_embedding",
    "visual.proj.weight": "visual.proj",
    "text.token_embedding.weight": "token_embedding.weight",
    "text.pos_embed": "positional_embedding",
    "text.ln_final.weight": "ln_final.weight",
    "text.ln_final.bias": "ln_final.bias",
    "text.proj.weight": "text_projection",
}
_TRANSPOSED = {"visual.proj.weight", "text.proj.weight"}
_BLOCK_PREFIXES = {
    "visual.blocks.": "visual.transformer.resblocks.",
    "text.blocks.": "transformer.resblocks.",
}


def open_clip_name(name: str) -> str:
    """open_clip's key for one of our ``ClipObjective`` state-dict keys (towers and ``logit_scale``)."""
    if name in _RENAMES:
        return _RENAMES[name]
    for ours, theirs in _BLOCK_PREFIXES.items():
        if name.startswith(ours):
            rest = name[len(ours) :].replace("attn.in_proj.weight", "attn.in_proj_weight")
            return theirs + rest.replace("attn.in_proj.bias", "attn.in_proj_bias")
    return name  # logit_scale, and visual.ln_pre / visual.ln_post, are named alike


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)})


def _heads(width: int, explicit: int | None, tower: str) -> int:
    """Heads cannot be read from the fused in-projection's shape, so they follow open_clip's rule."""
    if explicit is not None:
        return explicit
    if width % HEAD_WIDTH:
        raise ValueError(f"{tower} width {width} is not a multiple of {HEAD_WIDTH}; pass {tower}_heads")
    return width // HEAD_WIDTH


def infer_config(
    state_dict: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None,
    quick_gelu: bool = False,
) -> ModelConfig:
    """The ``clip`` ``ModelConfig`` of an open_clip ViT CLIP state dict, read from the tensor shapes.

    Widths, depths, patch size, image size (patch × √(positions − 1)), context length, vocabulary,
    embedding dimension and MLP ratio come from the shapes. Attention heads do not (the q, k, v projections of
    all heads are one matrix), so each tower gets width / 64, open_clip's default head width. That rule holds
    for ViT-B-32, ViT-B-16 and ViT-L-14; other models (ViT-H-14's image tower has 80-wide heads) need
    ``vision_heads`` / ``text_heads``. Wrong heads load without error but give different embeddings.

    Settings that leave no trace in the weights are assumed at open_clip's CLIP defaults: CLS pooling
    (``pool_type='tok'``), argmax text pooling, the causal text mask, pre-pool ``ln_post``. A state dict of a
    model configured otherwise (``pool_type='avg'``, ``no_causal_mask``, ...) loads, but embeds differently.
    So does the activation: OpenAI's weights and open_clip's ``*-quickgelu`` models were trained with QuickGELU,
    which only ``quick_gelu=True`` reproduces (the weights cannot tell).
    """
    try:
        patch_embed = state_dict["visual.conv1.weight"]
        vision_width, _, patch_size, _ = patch_embed.shape
        text_width = state_dict["ln_final.weight"].shape[0]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vocab_size = state_dict["token_embedding.weight"].shape[0]
        context_length = state_dict["positional_embedding"].shape[0]
        embed_dim = state_dict["text_projection"].shape[1]
        vision_hidden = state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        text_hidden = state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as missing:
        raise ValueError(f"not an open_clip ViT CLIP state dict: no {missing}") from None
    if vision_hidden * text_width != text_hidden * vision_width:
        raise ValueError(f"MLP ratios differ between towers ({vision_hidden}/{vision_width} vs "
                         f"{text_hidden}/{text_width}); our config has one mlp_ratio")
    return ModelConfig(
        objective="clip",
        image_size=patch_size * grid,
        patch_size=patch_size,
        vision_width=vision_width,
        vision_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        vision_heads=_heads(vision_width, vision_heads, "vision"),
        text_width=text_width,
        text_layers=_count_blocks(state_dict, "transformer.resblocks."),
        text_heads=_heads(text_width, text_heads, "text"),
        context_length=context_length,
        vocab_size=vocab_size,
        mlp_ratio=vision_hidden / vision_width,
        quick_gelu=quick_gelu,
        embed_dim=embed_dim,
    )


def from_open_clip(
    state_dict: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None,
    quick_gelu: bool = False,
) -> ClipObjective:
    """Our ``clip`` model holding the weights of an open_clip ViT CLIP (see ``infer_config`` for the heads, and
    ``quick_gelu`` for OpenAI-trained weights: ``open_clip.create_model("ViT-B-32-quickgelu", ...)``).

    The model takes the state dict's dtype, so ``to_open_clip`` gives the same tensors back. Keys open_clip
    has and we do not (attention pooling, layer scale, ...) raise ``ValueError`` rather than being dropped.
    """
    cfg = infer_config(state_dict, vision_heads, text_heads, quick_gelu)
    model = ClipObjective(cfg)
    ours_by_theirs = {open_clip_name(name): name for name in model.state_dict()}
    unknown = sorted(set(state_dict) - set(ours_by_theirs))
    missing = sorted(set(ours_by_theirs) - set(state_dict))
    if unknown or missing:
        raise ValueError(
            f"open_clip layout differs from ours: unknown keys {unknown[:8]}, missing {missing[:8]}"
        )
    model.to(state_dict["visual.conv1.weight"].dtype)
    ours = {
        ours_by_theirs[key]: value.T if ours_by_theirs[key] in _TRANSPOSED else value
        for key, value in state_dict.items()
    }
    model.load_state_dict(ours, strict=True)
    return model


def to_open_clip(model: ClipObjective) -> dict[str, torch.Tensor]:
    """open_clip's ``CLIP`` state dict of ``model``'s towers and logit scale (MAE-CLIP's decoder has no
    counterpart there and is left out). Loads with ``strict=True`` into the open_clip model of the same shape.

    Only models that open_clip computes the same way are accepted: CLS image pooling, EOT text pooling and a
    causal text tower. Fixed sin-cos image positions export as values of open_clip's learned table. A model
    with ``quick_gelu`` needs open_clip's ``CLIP(..., quick_gelu=True)`` to compute the same.
    """
    visual, text = model.visual, model.text
    if visual.pool != "cls" or text.pooler is not None or not text.causal:
        raise ValueError("open_clip's CLIP pools CLS and EOT with a causal text tower; this model does not")
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state.update({f"text.{k}": v for k, v in text.state_dict().items()})
    state["logit_scale"] = model.logit_scale.detach()
    return {
        open_clip_name(name): value.T.contiguous() if name in _TRANSPOSED else value
        for name, value in state.items()
    }

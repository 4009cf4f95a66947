"""Image classifier over patches with a middle class token and bidirectional mixers (Vision Mamba, arXiv 2401.09417).

    from zoo.config import ModelConfig
    from zoo.models.vision import VisionClassifier
    cfg = ModelConfig(architecture="vision", dim=64, depth=4, pattern=["bimamba"], mlp="none")
    logits, _ = VisionClassifier(cfg)(torch.rand(8, 1, 8, 8))          # (8, 10)
"""
from __future__ import annotations

import torch
from torch import nn

from zoo.config import ModelConfig
from zoo.layers.norm import RMSNorm
from zoo.models.lm import build_blocks


class VisionClassifier(nn.Module):
    """Patch embedding → class token inserted at position M//2 → + learned positions → pre-norm blocks → RMSNorm →
    ``Linear(dim, num_classes)`` at the class position.

    ``forward(images (B, C, H, W), state=None) -> (logits (B, num_classes), None)``. The mixers of ``model.pattern``
    must be bidirectional (``bimamba``, or ``attention`` with ``causal: false``); ``model.vision`` sets image size,
    channels, patch size, patch stride and classes. Patch embedding is ``Conv2d(C, dim, patch, stride)``:
    M = ((H − patch)/stride + 1)² tokens ((H/patch)² when stride = patch), M + 1 with the class token.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        vision, D = config.vision, config.dim
        stride = vision.patch_size if vision.patch_stride is None else vision.patch_stride
        if vision.image_size % vision.patch_size and vision.patch_stride is None:
            raise ValueError(f"VisionClassifier: image_size {vision.image_size} is not a multiple of patch_size "
                             f"{vision.patch_size}")
        if stride < 1 or vision.image_size < vision.patch_size or (vision.image_size - vision.patch_size) % stride:
            raise ValueError(f"VisionClassifier: patches of {vision.patch_size} pixels every {stride} do not tile "
                             f"image_size {vision.image_size}; choose patch_stride dividing image_size - patch_size")
        side = (vision.image_size - vision.patch_size) // stride + 1
        self.num_patches = side * side
        self.class_position = self.num_patches // 2
        self.patch_embed = nn.Conv2d(vision.channels, D, kernel_size=vision.patch_size, stride=stride)
        self.class_token = nn.Parameter(torch.empty(1, 1, D))
        self.position = nn.Parameter(torch.empty(1, self.num_patches + 1, D))
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = build_blocks(config)
        for i, block in enumerate(self.blocks):
            if block.mixer is not None and block.mixer.causal:
                raise ValueError(f"VisionClassifier: mixer '{config.pattern[i % len(config.pattern)]}' is causal; "
                                 f"use bimamba, mlp, or attention with model.attention.causal=false")
        self.norm = RMSNorm(D, config.norm_eps)
        self.head = nn.Linear(D, vision.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the released Vim code: patch embedding lecun-normal (truncated normal of std 1/sqrt(fan_in), zero bias);
        class token, positions and head trunc-normal(0.02), zero head bias; mixers their own, then every block's
        ``out_proj`` weight divided by sqrt(n · depth), n = residual branches per block (1 without an MLP, as in Vim).
        """
        fan_in = self.patch_embed.weight[0].numel()                                # C · patch²
        # std / 0.8796 before truncation at ±2 std gives std after it (the lecun-normal of the released code)
        nn.init.trunc_normal_(self.patch_embed.weight, std=fan_in ** -0.5 / 0.87962566103423978,
                              a=-2 * fan_in ** -0.5 / 0.87962566103423978, b=2 * fan_in ** -0.5 / 0.87962566103423978)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        for block in self.blocks:
            block.reset_parameters()
            out_proj = getattr(block.mixer, "out_proj", None)
            if out_proj is not None:
                branches = 1 + int(block.mlp is not None)
                with torch.no_grad():
                    out_proj.weight.div_((branches * len(self.blocks)) ** 0.5)
        self.norm.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay: class token, positions, norms, biases and those mixers mark."""
        names = {"class_token", "position"}
        for module_name, module in self.named_modules():
            marked = set(getattr(module, "_no_weight_decay", ()))
            for param_name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if isinstance(module, RMSNorm) or param.dim() < 2 or param_name in marked:
                    names.add(full)
        return names

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token in the middle and positions added: (B, M+1, D)."""
        if images.dim() != 4:
            raise ValueError(f"VisionClassifier: images must be (B, C, H, W), got shape {tuple(images.shape)}")
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)   # (B, M, D)
        cls = self.class_token.expand(x.shape[0], -1, -1).to(x.dtype)                             # (B, 1, D)
        m = self.class_position
        x = torch.cat([x[:, :m], cls, x[:, m:]], dim=1)                                           # (B, M+1, D)
        return x + self.position.to(x.dtype)

    def forward(self, images: torch.Tensor, state=None):
        if state is not None:
            raise ValueError("VisionClassifier is not recurrent; call it with state=None")
        h = self.embed_dropout(self.tokens(images))
        for block in self.blocks:
            h, _ = block(h)
        h = self.norm(h[:, self.class_position])                                                  # (B, D)
        return self.head(h), None

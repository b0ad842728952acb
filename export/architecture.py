"""The network a bioimage.io package of a triageseg model describes, buildable without triageseg.

This file is copied into every exported package as the ``pytorch_state_dict`` weights'
architecture source, so it imports only torch, segmentation_models_pytorch and timm
(never triageseg): a zoo runner with those libraries rebuilds the network from it.
The softmax is inside the module, so the package's output is class probabilities.
No weights are ever downloaded (``encoder_weights=None`` / ``pretrained=False``).
"""

from __future__ import annotations

from typing import Sequence

import torch


class SoftmaxUnet(torch.nn.Module):
    """smp ``Unet`` followed by a softmax over the class axis: ``B x C x H x W`` -> probabilities."""

    def __init__(self, encoder: str = "efficientnet-b3", decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                 in_channels: int = 3, classes: int = 3) -> None:
        import segmentation_models_pytorch as smp

        super().__init__()
        self.net = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes,
                            decoder_channels=tuple(int(c) for c in decoder_channels))
        # The memory-efficient swish is an autograd.Function, which TorchScript cannot hold.
        if hasattr(self.net.encoder, "set_swish"):
            self.net.encoder.set_swish(memory_efficient=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class TemperatureViT(torch.nn.Module):
    """timm ViT classifier with a temperature-scaled softmax: ``B x 3 x S x S`` -> class probabilities ``B x K``."""

    def __init__(self, model_name: str = "vit_tiny_patch16_224", num_classes: int = 2, image_size: int = 224,
                 temperature: float = 1.0) -> None:
        import timm

        super().__init__()
        self.net = timm.create_model(model_name, pretrained=False, num_classes=int(num_classes),
                                     img_size=int(image_size))
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x) / self.temperature, dim=1)


def triageseg_unet(encoder: str = "efficientnet-b3", decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                   in_channels: int = 3, classes: int = 3) -> SoftmaxUnet:
    """Build the specialist network (untrained); the package's state dict is loaded into it."""
    return SoftmaxUnet(encoder, decoder_channels, in_channels, classes)


def triageseg_router(model_name: str = "vit_tiny_patch16_224", num_classes: int = 2, image_size: int = 224,
                     temperature: float = 1.0) -> TemperatureViT:
    """Build the modality classifier (untrained); the package's state dict is loaded into it."""
    return TemperatureViT(model_name, num_classes, image_size, temperature)

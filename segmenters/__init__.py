"""Modality specialists: smp Unet factory, training loop and tiled inference."""

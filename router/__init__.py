"""Modality triage: timm ViT classifier and modality discovery (scikit-learn)."""

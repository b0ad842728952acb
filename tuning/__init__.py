"""Per-modality hyperparameter search with Ray Tune."""

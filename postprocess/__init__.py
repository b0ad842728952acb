"""Post-processing and scoring: 3-class targets, watershed, F1 evaluator (NumPy/SciPy/scikit-image only)."""

"""Image and label I/O, dataset layout, importers and the synthetic generator (NumPy/SciPy/scikit-image only)."""

"""bioimage.io model packages out and in, written and validated by the zoo's own libraries.

- :mod:`.specialist`: a specialist or the generalist -> a model package (3-class softmax).
- :mod:`.router`: the modality classifier -> a classification package.
- :mod:`.importer`: a zoo package -> a specialist of a bundle (our own exactly; a foreign
  foreground/boundary model as a trusted TorchScript entry, :mod:`.zoo_segmenter`).
- :mod:`.architecture`: the network builders the packages name; imports no triageseg.
- :mod:`.ts_watershed`: a torch-only seeded flood, measured against our watershed.

``bioimageio.spec`` / ``bioimageio.core`` are imported only inside functions (extra ``bioimageio``).
"""

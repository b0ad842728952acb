"""The napari plugin (``pip install "triageseg[napari]"``): a dock widget and a reader.

- :mod:`~triageseg.napari_plugin.widget`: *Plugins > triageseg > Nuclei segmentation*:
  choose a bundle, Route or Segment the selected image layer.
- :mod:`~triageseg.napari_plugin.reader`: opens a ``triageseg segment`` output folder.
- :mod:`~triageseg.napari_plugin.steps`: the work itself, without Qt.
- :mod:`~triageseg.napari_plugin.llvm_guard`: keeps triton from crashing a process whose
  OpenGL driver loaded LLVM.

``napari.yaml`` is the npe2 manifest, found through the ``napari.manifest`` entry point.
Importing this package does not import napari or Qt.
"""

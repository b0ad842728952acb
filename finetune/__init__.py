"""The correct -> add -> fine-tune -> new bundle loop (napari's buttons and ``triageseg finetune`` call these).

- :func:`add_to_training_set`: one image, its corrected labels and modality into a dataset folder;
- :func:`finetune`: a modality's specialist fine-tuned on those images, written as a new bundle
  whose ``bundle.json`` names its parent and the data (a new modality also gets a router class).
"""

from triageseg.finetune.collect import Added, add_to_training_set, check_corrected_labels, dataset_checksum
from triageseg.finetune.run import FinetuneResult, finetune, partial_dir, plan_steps, score_model

__all__ = [
    "Added",
    "FinetuneResult",
    "add_to_training_set",
    "check_corrected_labels",
    "dataset_checksum",
    "finetune",
    "partial_dir",
    "plan_steps",
    "score_model",
]

"""The in-memory and batch path: one image (:mod:`.single`), many files on this machine (:mod:`.batch`),
the interactive views, the records and outputs beside the labels, and the size decision."""

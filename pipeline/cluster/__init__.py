"""The Ray path: many files in one Ray Data pass (:mod:`.distributed`, stages in :mod:`.ray_stages`),
huge images as Ray tasks (:mod:`.ray_blocks`, scheduled across the slides of a run by :mod:`.ray_slides`), paths and URIs on shared storage (:mod:`.storage`)."""

"""The block path for huge images: normalisation statistics, probabilities once per pixel into a store
(:mod:`.probstore`, journalled by :mod:`.journal`), decoded block by block (:mod:`.blocks`, :mod:`.stitch`)
into the whole image's labels (:mod:`.large`), and GeoJSON from them."""

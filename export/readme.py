"""The README.md that travels in each package: what goes in, what comes out, how to get instances."""

from __future__ import annotations


def segmenter_readme(*, name, config, params, drawn: str, n_objects: int, float16: bool) -> str:
    """README of a specialist package: normalisation, output, the exact watershed, validation."""
    p = params.to_dict()
    lo, hi = config.percentiles
    modality = config.modality or "every modality of its training data (the generalist)"
    scale_note = (
        f"\n**Resize first.** This model was trained with images resized by a factor {config.scale:g}; "
        "resize the raw image by that factor (bilinear) before the package, and the probabilities back.\n"
        if config.scale != 1.0 else "")
    storage = ("Both weight files store **fp16** tensors (half the size); the network computes in fp32, "
               "so its outputs differ from the fp32 original only by the rounding of the weights."
               if float16 else "Both weight files store fp32 tensors, identical to the triageseg bundle's.")
    return f"""# triageseg `{name}`: nucleus segmentation for {modality}

A segmentation_models_pytorch `Unet` (encoder `{config.encoder}`, decoder {list(config.decoder_channels)},
trained from scratch, no pretrained weights) exported from a triageseg model bundle
(`segmenters/{name}`). In triageseg a ViT router sends each image to the specialist of its
modality; this package is one of those specialists, usable on its own.

## Input

`raw`: `batch, channel, y, x`, 3 channels (RGB; a gray image is repeated 3 times), y and x
any multiple of 32 (at least 64). Preprocessing, expressed with the zoo's own operations:
`scale_range` over channel, y and x jointly, per image, percentiles {lo:g} and {hi:g}, then
`clip` to [0, 1].{scale_note}

**How this differs from triageseg's own normalisation** (`datasets.io.normalize_image`), so a
zoo runner's result can differ slightly from `triageseg segment`:

1. the zoo divides by `(p{hi:g} - p{lo:g} + 1e-6)`, triageseg by `(p{hi:g} - p{lo:g})`: relative difference
   about 1e-6 / range, invisible after the softmax on 8/16-bit data;
2. triageseg falls back to min/max when the two percentiles coincide (a near-constant image)
   and returns zeros for a constant image; the zoo divides by eps there;
3. triageseg estimates the percentiles of images above 4 million values on a strided subsample
   (every H/1000-th row and W/1000-th column); the zoo uses every pixel;
4. the zoo normalises each *tile* it is given; triageseg normalises the whole image once and
   tiles afterwards. Run a whole image through the package (or feed tiles of an image you have
   normalised yourself and drop the preprocessing) to match triageseg.

The test tensors were computed the zoo's way (eps included), so `bioimageio.core`'s test
reproduces them.

## Output

`probabilities`: `batch, channel, y, x`, the softmax over 3 classes, channel 0 background,
1 nucleus interior, 2 nucleus boundary (the boundary class marks the outer {config.boundary_width}-pixel
rim of each nucleus, mode `{config.boundary_mode}`). The softmax is inside the network.

{storage}

## From probabilities to instances (not inside the package)

triageseg's watershed, with the parameters tuned for these weights on the validation images
(`postprocess.json`, attached):

| parameter | value |
|---|---|
| marker_threshold | {p['marker_threshold']} |
| mask_threshold | {p['mask_threshold']} |
| min_marker_size | {p['min_marker_size']} |
| min_size | {p['min_size']} |
| min_score | {p.get('min_score', 0.0)} |

With `P0, P1, P2` the three channels:

1. foreground = `P1 + P2 > mask_threshold`;
2. seeds = `P1 - P2 > marker_threshold` and foreground; seed components: 8-connected, those
   smaller than `min_marker_size` pixels dropped;
3. each 8-connected foreground component with no seed is one object; with one seed it is
   that object; with several seeds it is flooded from its seeds over the elevation
   `round((1 - P1) * 255)` (skimage `watershed`, connectivity 2, mask = the component);
4. objects whose highest `P1` is below `min_score` are removed, and objects smaller than
   `min_size` pixels; labels renumbered 1..n.

In Python with triageseg installed: `from triageseg.postprocess.watershed import watershed,
WatershedParams; labels = watershed(probs, WatershedParams.from_json("postprocess.json"))`.
Without triageseg, steps 1-4 with scipy.ndimage.label and skimage.segmentation.watershed give the
same objects except on plateaus of equal elevation, where triageseg orders ties by distance to
the seeds.

**Why the watershed is not inside the TorchScript.** We measured a torch-only seeded flood
(iterative 3x3 max-pool label propagation by elevation bands, scripted) on the demo bundle's
outputs: it took about as long as the network itself (0.84x on CPU, 35x our watershed), since it
iterates about as many times as a nucleus is wide, and it agreed with the watershed at mean F1
0.946 only (its split lines differ), without scoring better against the ground truth (see
triageseg's `benchmarks/bench_bioimageio.py` and RESULTS.md). So the package exports the probabilities and this
README gives the exact post-processing.

## Validation

triageseg scores instances with F1 averaged over IoU thresholds 0.50:0.95 (stardist's
`matching_dataset`). The test tensors are a synthetic `{drawn}` image (triageseg's generator,
seed 0); the cover shows it with the {n_objects} outlines decoded from the test output. To validate on
your data: run the package, decode as above, and score against your labels with
`triageseg evaluate PRED GT`.

## Limitations

Trained on triageseg's synthetic data unless the bundle says otherwise (`triageseg_config.json`,
attached, holds the model config). Not for 3D, not for cells (whole cytoplasm), not for nuclei
far outside the training diameter.
"""


def router_readme(*, config, n_views_note: str) -> str:
    """README of the router (modality classifier) package."""
    classes = ", ".join(f"{i} `{c}`" for i, c in enumerate(config.class_names))
    mean, std = config.mean, config.std
    return f"""# triageseg router: which imaging modality is this image?

A timm `{config.model_name}` classifier (trained from scratch) exported from a triageseg bundle.
In triageseg it looks at each image and routes it to the segmentation specialist of its
modality; with this package a zoo user can triage the same way.

## Input

`thumbnail`: `batch, channel, y, x` = `1, 3, {config.image_size}, {config.image_size}`, RGB in [0, 1]:
the whole image, percentile-normalised (1 / 99.8, joint over channels, clipped), resized so
its longer side is {config.image_size} pixels and padded to a square with its background colour
(triageseg `router.model.make_thumbnail`). Preprocessing inside the package:
`fixed_zero_mean_unit_variance` per channel, mean {list(mean)}, std {list(std)}.
{n_views_note}

## Output

`probabilities`: `batch, channel` = class probabilities, softmax of the logits divided by the
fitted temperature {config.temperature:g}: {classes}.

triageseg falls back to a generalist when the top probability is below the bundle's
confidence threshold ({config.confidence_threshold:g} by default).

## Validation

Accuracy on the bundle's test split is in its `bundle.json`. The test tensors are a thumbnail of a
synthetic image from triageseg's generator.
"""

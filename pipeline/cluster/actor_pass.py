"""The small images' pass on CPU actors: plain Ray actors that read, segment, decode and write their own images.

When the actors decode their own images (``ClusterOptions.decode``, the default for CPU
actors) the pass has no task stage left for Ray Data to schedule, so it runs on plain
actors: the driver hands out batches of inputs, at most :data:`IN_FLIGHT` per actor (one
running, one waiting, so an actor never idles on the driver's round trip), and takes the
next batch for whichever actor returns first. This costs less than a Ray Data pass: no
streaming executor in the driver, none of the helper actors Ray Data starts (its stats
actor, autoscaling coordinator and location tracker, each a Python process of its own),
which on a 2-core machine competed with the segmenting actor's own start (48 images of
512 x 512: 19.3-22.6 s against Ray Data's 24.4-24.6 s, the local run 16.0-17.6 s;
``benchmarks/RESULTS.md``).

Faults, as with Ray Data: actors are restarted (``max_restarts=-1``) and a call on a lost
actor is retried (``max_task_retries=-1``); each call writes its images atomically, so a
retried batch leaves no duplicate. Work goes only to actors that have started: an actor
the cluster cannot place yet holds no batch, so the others finish the pass without it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from triageseg.pipeline.cluster.ray_stages import BundleSource, SegmentActor, StageOptions, _columns, _rows

IN_FLIGHT = 2  # batches per actor at once


def actor_pass(items: list[dict], bundle: BundleSource, stage: StageOptions, *, actors: int, cpus: float,
               gpus: float = 0.0, images_per_batch: int = 4, progress: bool = False) -> Iterator[dict]:
    """Result rows (as ``write_stage`` makes them) of ``items`` segmented on ``actors`` plain actors.

    Args:
        items: the inputs (``index``, ``file``, ``name``, ``source``).
        bundle, stage: what each :class:`SegmentActor` is made with (``stage.decode_in_actor`` set).
        actors: how many actors to start (fewer when there are fewer batches).
        cpus, gpus: each actor's resources.
        images_per_batch: inputs per actor call.
        progress: a progress bar of images done.
    """
    import ray
    from tqdm import tqdm

    if not stage.decode_in_actor:
        raise ValueError("actor_pass needs actors that decode their own images (StageOptions.decode_in_actor)")
    size = max(1, int(images_per_batch))
    todo = deque(_columns(items[i:i + size]) for i in range(0, len(items), size))
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus if gpus > 0 else None, max_restarts=-1,
                        max_task_retries=-1)(SegmentActor)
    pool = [remote.remote(bundle, stage) for _ in range(max(1, min(int(actors), len(todo))))]
    starting = {actor.ready.remote(): actor for actor in pool}
    running: dict = {}  # call -> actor

    def hand_out(actor) -> None:
        if todo:
            running[actor.__call__.remote(todo.popleft())] = actor

    bar = tqdm(total=len(items), desc="segment", unit="image", disable=not progress)
    try:
        while todo or running:
            done, _ = ray.wait([*starting, *running], num_returns=1)
            ref = done[0]
            if ref in starting:
                actor = starting.pop(ref)
                ray.get(ref)
                for _ in range(IN_FLIGHT):
                    hand_out(actor)
                continue
            actor = running.pop(ref)
            rows = _rows(ray.get(ref))
            hand_out(actor)
            bar.update(len(rows))
            yield from rows
    finally:
        bar.close()
        for actor in pool:
            ray.kill(actor)

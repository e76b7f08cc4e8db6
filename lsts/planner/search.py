"""``launch/plan.py --search``: the layouts of a world and memory modes that fit a budget, fastest
first, each with the longest sequence it admits.

Candidates: every ``cp_ring × cp_ulysses × tp × pp × dp_shard`` of the world (``dp_replicate`` 1)
that the trainer accepts for the model, with activation checkpointing none / full / full with
offload (offload only where it frees memory: on a GPU) and feed-forward tiles off or on (4096
tokens), the loss chunk as configured. Each is predicted at the configured sequence length
(`lsts.planner.predict.predict`, a full trace); for those that fit, the longest sequence comes from
one more trace at a short length and the affine fit of `longest_sequence` through both (not
verified by a trace at the answer). Ordered by the roofline
step time on a GPU, by FLOPs per rank (with recomputation) on CPU, then by peak memory.
"""

from __future__ import annotations

import copy
import itertools

from lsts.config import Config
from lsts.parallel.dims import ParallelDims
from lsts.planner.predict import Prediction, check_world, measure_baseline, predict

MLP_TILE = 4096


def _factorizations(n: int, k: int):
    """Ordered ``k``-tuples of positive integers whose product is ``n``."""
    if k == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in _factorizations(n // d, k - 1):
                yield (d, *rest)


def candidates(cfg: Config, nproc: int, gpu: str | None):
    """Copies of ``cfg`` for every layout and memory mode (see the module) the trainer accepts."""
    modes = [("none", False), ("full", False)] + ([("full", True)] if gpu is not None else [])
    for (ring, uly, tp, pp, dp), (ac, offload), tile in itertools.product(
        _factorizations(nproc, 5), modes, (0, MLP_TILE)
    ):
        c = copy.deepcopy(cfg)
        p = c.parallel
        p.cp_ring, p.cp_ulysses, p.tp, p.pp, p.dp_shard, p.dp_replicate = ring, uly, tp, pp, dp, 1
        p.activation_checkpoint, p.activation_offload, p.mlp_tile_tokens = ac, offload, tile
        if pp > 1:
            p.pp_microbatches = c.data.batch_size
        try:
            check_world(c, ParallelDims.from_config(p, nproc), nproc)
        except ValueError:
            continue
        yield c


def longest_sequence(
    cfg: Config, nproc: int, gpu: str | None, budget: float, baseline: dict | None = None, verify: bool = True,
    known: Prediction | None = None,
) -> int:  # fmt: skip
    """The longest ``data.seq_len`` (a multiple of the layout's divisor) whose predicted peak is
    within ``budget`` bytes: traces at a short length and a longer one fit peak = a + c·S (every
    term grows with S or not at all: activations, chunked attention, ring buffers; parameters, the
    loss chunk), then with ``verify`` traces at the answer step it down by 5 % until it fits. 0 when
    even the short one does not fit. ``known``: the prediction at ``cfg``'s own length, the longer
    point when it is longer (the further apart, the truer the slope: on Llama-3-8B two points at
    2K and 4K tokens under-estimate it by 16 %)."""
    div = cfg.parallel.resolved(nproc).seq_len_divisor  # cp_ring = -1 (the default) is known only with the world

    def prediction(s: int) -> Prediction:
        c = copy.deepcopy(cfg)
        c.data.seq_len = s
        return predict(c, nproc, gpu, baseline)

    # Long enough for window spans, loss chunks and feed-forward tiles (per rank) to be in their linear regime.
    shortest = max(2048, 2 * cfg.parallel.mlp_tile_tokens * cfg.parallel.cp)
    s1 = -(-shortest // div) * div
    first = prediction(s1)
    if first.peak_bytes > budget:
        return 0
    s2 = cfg.data.seq_len if known is not None and cfg.data.seq_len > s1 else 2 * s1
    second = known if known is not None and s2 == cfg.data.seq_len else prediction(s2)
    # The sum of the parts (the CPU start-up's own transient peak is no function of S).
    p1, p2 = sum(first.memory.values()), sum(second.memory.values())
    s = int(s1 + (budget - p1) * (s2 - s1) / max(p2 - p1, 1)) // div * div
    while verify and s > s1 and prediction(s).peak_bytes > budget:
        s = max(int(s * 0.95) // div * div, s1)
    return s


def _speed_key(p: Prediction):
    return (p.step_time_s["step"] if p.step_time_s else p.rank_flops, p.peak_bytes)


def search(cfg: Config, nproc: int, gpu: str | None, budget: float) -> list[dict]:
    """Rows ``{layout, peak_gib, step_s, longest_seq_len}`` of the candidates that fit ``budget``
    bytes per rank at the configured sequence length, fastest first."""
    fits = []
    # The CPU start-up (imports, corpus, writer) does not depend on the layout: measured once.
    baseline = measure_baseline(cfg, ParallelDims.from_config(cfg.parallel, nproc)) if gpu is None else None
    for c in candidates(cfg, nproc, gpu):
        p = predict(c, nproc, gpu, baseline)
        if p.peak_bytes <= budget:
            fits.append((c, p))
    fits.sort(key=lambda cp: _speed_key(cp[1]))
    return [
        {
            "layout": p.layout,
            "peak_gib": p.peak_gib,
            "step_s": p.step_time_s["step"] if p.step_time_s else None,
            "longest_seq_len": longest_sequence(c, nproc, gpu, budget, baseline, verify=False, known=p),
        }
        for c, p in fits
    ]


__all__ = ["candidates", "longest_sequence", "search"]

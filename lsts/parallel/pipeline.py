"""Pipeline parallelism with `torch.distributed.pipelining` and a 1F1B schedule.

`split_stage` keeps a contiguous run of layers on each of the ``pp`` stages (the first keeps the
embedding, the last the final norm and the output projection, so embeddings must be untied). The
layers keep their names (``layers.<i>``), so checkpoints of a pipelined run load into any other
layout by name.

Only the hidden state travels between stages. What every layer needs besides it — the token
positions and the attention context (context-parallel groups, packed documents) — is the same for
all stages of a micro-batch and is known to every stage, because all stages of a pipeline load the
same batch: `PipelineRunner` hands each stage the side information of micro-batch i when the
schedule runs its i-th forward. One micro-batch is one row of the batch (documents differ by row).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B


def check_pipeline(pp: int, n_layers: int, tie_embeddings: bool) -> None:
    """ValueError before any collective for a model the pipeline cannot split."""
    if pp == 1:
        return
    if n_layers < pp:
        raise ValueError(f"parallel.pp ({pp}) stages need at least as many layers; model.n_layers is {n_layers}")
    if tie_embeddings:
        raise ValueError(
            "parallel.pp > 1 puts the embedding on the first stage and the output projection on the last: "
            "set model.tie_embeddings=false"
        )


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """Layer indices of ``stage``: contiguous, as even as possible (earlier stages take the rest)."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def split_stage(model: nn.Module, pp: int, stage: int) -> nn.Module:
    """Prune ``model`` (a MASFormer) in place to the layers and ends of ``stage``."""
    keep = {str(i) for i in stage_layers(len(model.layers), pp, stage)}
    for name in [n for n in model.layers if n not in keep]:
        del model.layers[name]
    if stage > 0:
        model.tok_embeddings = None
    if stage < pp - 1:
        model.norm = None
        model.output = None
    return model


class _Stage(nn.Module):
    """The stage as the schedule sees it: one tensor in (tokens or hidden), one out. Micro-batch
    i's positions and attention context come from `side` in forward order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.side: list[tuple[torch.Tensor, object]] = []
        self.calls, self.inferred, self.inferring = 0, False, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The schedule's first call ever is its shape-inference pass on stand-in inputs: give it
        # micro-batch 0's side information without consuming it.
        positions, ctx = self.side[self.calls if self.inferred else 0]
        self.inferring = not self.inferred
        self.calls += self.inferred
        self.inferred = True
        return self.model(x, positions, ctx)


class PipelineRunner:
    """Forward and backward of one batch through the pipeline; the loss lives on the last stage.

    ``loss_fn(hidden, labels, output_weight) -> (loss to backpropagate, loss sum to report)``."""

    def __init__(self, model: nn.Module, stage: int, pp: int, group, device: torch.device, n_micro: int, loss_fn):
        self.stage, self.pp, self.n_micro = stage, pp, n_micro
        self.module = _Stage(model)
        self.reported: list[torch.Tensor] = []
        self._loss_fn = loss_fn
        pipe_stage = PipelineStage(self.module, stage, pp, device, group=group)
        self.schedule = Schedule1F1B(pipe_stage, n_micro, loss_fn=self._loss, scale_grads=False)

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model = getattr(self.module.model, "module", self.module.model)  # DDP wraps the stage
        loss, reported = self._loss_fn(hidden, labels, model.output_weight)
        if not self.module.inferring:  # the shape-inference pass's loss is not a micro-batch's
            self.reported.append(reported.detach())
        return loss

    def run(self, tokens: torch.Tensor, labels: torch.Tensor, side: list[tuple[torch.Tensor, object]]) -> torch.Tensor:
        """One row per micro-batch; ``side[i] = (positions, ctx)`` of row i. Returns the summed
        reported loss on the last stage (zero elsewhere), float64."""
        self.module.side, self.module.calls, self.reported = side, 0, []
        if self.stage == 0:
            self.schedule.step(tokens)
        elif self.stage == self.pp - 1:
            self.schedule.step(target=labels)
        else:
            self.schedule.step()
        total = torch.zeros((), dtype=torch.float64)
        for r in self.reported:
            total += r.double().cpu()
        return total


def pipeline_loss(scale: Callable[[], float], **ce_kwargs):
    """The last stage's loss: chunked linear-CE summed over the row, times the step's scale."""
    from lsts.kernels.loss import linear_cross_entropy

    def loss_fn(hidden, labels, weight):
        loss, _ = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight.to(hidden.dtype), labels.reshape(-1), **ce_kwargs
        )
        return loss * scale(), loss

    return loss_fn


__all__ = ["PipelineRunner", "check_pipeline", "pipeline_loss", "split_stage", "stage_layers"]

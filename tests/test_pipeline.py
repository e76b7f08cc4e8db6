"""Pipeline parallelism (1F1B over 2 gloo ranks) against the whole model in one process: the loss
and every parameter's gradient, per stage, in float64; stage splitting."""

import pytest
import torch

from lsts.attention import LOCAL
from lsts.config import KernelsConfig, ModelConfig
from lsts.models.masformer import MASFormer
from lsts.parallel.pipeline import check_pipeline, pipeline_loss, split_stage, stage_layers
from tests.distributed import run_ranks

CFG = ModelConfig(
    vocab_size=64, dim=32, n_layers=5, n_heads=4, n_kv_heads=2, tie_embeddings=False, full_layers="top", n_full=1,
    span="window", span_size=8,
)  # fmt: skip
KERNELS = KernelsConfig(attention="torch", loss="torch", norm="torch", rope="torch")


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CFG.vocab_size, (3, 24), generator=g)
    labels = torch.randint(0, CFG.vocab_size, (3, 24), generator=g)
    return tokens, labels, torch.arange(24)


def _model():
    model = MASFormer(CFG, KERNELS).double()
    model.init_weights(seed=7)
    return model


def _whole():
    model = _model()
    tokens, labels, pos = _batch()
    hidden = model(tokens, pos)
    loss = torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), labels.flatten(), reduction="sum")
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _stage(rank, world):
    from lsts.parallel.pipeline import PipelineRunner

    model = split_stage(_model(), world, rank)
    tokens, labels, pos = _batch()
    runner = PipelineRunner(
        model, rank, world, None, torch.device("cpu"), 3,
        pipeline_loss(lambda: 1.0, reduction="sum", backend="torch"),
    )  # fmt: skip
    total = runner.run(tokens, labels, [(pos, LOCAL)] * 3)
    return total.item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}  # by value


def test_two_stage_pipeline_equals_whole_model():
    want_loss, want_grads = _whole()
    results = run_ranks(_stage, 2)
    assert results[0][0] == 0.0
    assert abs(results[1][0] - want_loss) <= 1e-10 * want_loss
    seen = set()
    for _, grads in results:
        for name, g in grads.items():
            assert torch.allclose(torch.from_numpy(g), want_grads[name], rtol=1e-9, atol=1e-12), name
            seen.add(name)
    assert seen == set(want_grads), "every parameter lives on exactly one stage"


def test_stage_layers_cover_the_model_in_order():
    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(stage_layers(4, 4, s)) for s in range(4)] == [[0], [1], [2], [3]]


@pytest.mark.parametrize(
    "pp,n_layers,tied,match", [(3, 2, False, "at least as many layers"), (2, 4, True, "tie_embeddings=false")]
)
def test_pipeline_config_errors(pp, n_layers, tied, match):
    with pytest.raises(ValueError, match=match):
        check_pipeline(pp, n_layers, tied)

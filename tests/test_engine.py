"""The contract between the training loop and its jobs (`lsts.train.engine`): both jobs and the
PyTorch update provide every member of the `Job` / `Update` protocols, and an object missing one
does not pass for them. The engines themselves are tested end to end by tests/test_train.py and
tests/test_finetune.py (every parameter's gradient and update against one process)."""

import torch

from lsts.config import load_config
from lsts.finetune.config import load_finetune_config
from lsts.finetune.trainer import FinetuneJob
from lsts.train.engine import Job, TorchUpdate, Update
from lsts.train.trainer import MASFormerJob
from tests.hf_models import save_tiny_llama


def test_both_jobs_are_jobs(tmp_path):
    model = save_tiny_llama(tmp_path / "llama", vocab_size=256)  # the byte tokenizer needs 256 ids
    assert isinstance(MASFormerJob(load_config([f"--out={tmp_path}"])), Job)
    assert isinstance(FinetuneJob(load_finetune_config([f"--model={model}", f"--out={tmp_path}"])), Job)


def test_the_torch_update_is_an_update(tmp_path):
    cfg = load_config([f"--out={tmp_path}"])
    update = TorchUpdate(torch.nn.Linear(2, 2), cfg, loss_fn=lambda m, x, *_: m(x).sum())
    assert isinstance(update, Update)
    with torch.no_grad():  # the row's loss is loss_fn on the update's model
        assert torch.equal(update.loss(torch.ones(1, 2), None, None, None), update.model(torch.ones(1, 2)).sum())


def test_an_object_missing_a_member_is_neither(tmp_path):
    job = MASFormerJob(load_config([f"--out={tmp_path}"]))
    del job.vocab_size  # set per instance: the loop sizes the data's token ids by it
    assert not isinstance(job, Job)

    class NoStep:
        runner, checkpoint_parts, scheduler = None, (), None

        def loss(self, *row): ...

        def backward(self, loss): ...

    assert not isinstance(NoStep(), Update)

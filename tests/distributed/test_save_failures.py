"""A save that fails on one rank fails on every rank, with the same one-line message naming that rank's file: no
rank waits in a collective the others skipped, none reports a checkpoint another rank failed to write, and the
next save that can write succeeds. Two gloo ranks (ep 2), one spawn, three saves of one tiny trainer:
1. rank 1 alone under a file-size limit fails inside DCP's collective write;
2. rank 1 alone fails writing its own RNG file (an I/O error outside DCP, agreed by moeforge's own all-gather);
3. no fault: the checkpoint is complete and verified."""
from __future__ import annotations

import errno

from tests.distributed._spawn import run_distributed


def _ranks(rank: int, world_size: int, root: str, cache: str) -> None:
    import resource
    import signal
    from pathlib import Path
    from unittest import mock

    import torch
    import torch.distributed as dist

    from parallel import init_distributed
    from tests.small_runs import SMALL
    from train.checkpoint import save_resume, verify_checkpoint
    from train.checkpoint.save_errors import SaveError
    from train.config import load_train_config
    from train.trainer.loop import Trainer
    from train.trainer.validate import validate_config

    cfg = load_train_config([*SMALL, f"data.cache_dir={cache}", f"trainer.run_dir={root}", "trainer.max_steps=4",
                             "trainer.save_every=2", "parallel.ep_size=2", "trainer.global_batch_size=8"])
    validate_config(cfg, world_size=world_size)
    mesh = init_distributed(cfg)
    trainer = Trainer(cfg, mesh)
    trainer.fit(stop_at=3)  # checkpoint at step 2; step 3 is not a save step
    save = lambda: save_resume.save_checkpoint(trainer.state, trainer.saved_cfg, mesh, Path(root),  # noqa: E731
                                               trainer.data.tokenizer_dir)
    messages = []

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        save()
    except SaveError as e:
        messages.append(str(e))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    real_save = torch.save

    def eio_on_rank_file(obj, path, *a, **k):
        if rank == 1 and str(path).endswith("train_state_rank1.pt"):
            raise OSError(errno.EIO, "Input/output error")
        return real_save(obj, path, *a, **k)

    with mock.patch.object(save_resume.torch, "save", eio_on_rank_file):
        try:
            save()
        except SaveError as e:
            messages.append(str(e))

    everyone = [None] * world_size
    dist.all_gather_object(everyone, messages)
    assert everyone[0] == everyone[1], everyone  # one outcome, one message, on every rank
    assert len(messages) == 2, messages
    assert "rank 1: writing" in messages[0] and "state/__1_0.distcp failed" in messages[0], messages[0]
    assert "file-size limit" in messages[0]
    assert "rank 1: writing" in messages[1] and "train_state_rank1.pt failed: [EIO]" in messages[1], messages[1]
    assert all("step_00000002" in m for m in messages)  # the checkpoint a resume would use
    path = save()  # the disk is fine again
    if rank == 0:
        names = sorted(p.name for p in (Path(root) / "checkpoints").iterdir())
        assert names == ["step_00000002", "step_00000003"], names  # no .tmp_* left by the failed saves
        verify_checkpoint(path)
    trainer.close()


def test_a_failed_write_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    run_distributed(_ranks, 2, str(tmp_path / "run"), str(tmp_path / "cache"))

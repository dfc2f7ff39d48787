"""Every routing scheme under expert parallelism (2 gloo ranks, ep_size 2) against the same model unsharded on
one rank's tokens: the plan shape is the same, so the all-to-all dispatcher must give the same logits, loss, balance
terms and non-expert gradients. The unsharded copy sums its counts over the ranks as the parallel one does, and
draws the same noise (same seed before each forward)."""
import torch

from tests.distributed._spawn import run_distributed

SCHEMES = ("tiny_noisy_topk", "tiny_switch", "tiny_gshard", "tiny_st_moe", "tiny_expert_choice", "tiny_base",
           "tiny_hash")
ATOL = RTOL = 1e-5


def _cfg(name):
    from train.config import load_train_config
    return load_train_config([f"model={name}", "parallel.ep_size=2", "trainer.device=cpu", "model.vocab_size=96",
                              "model.d_model=32", "model.num_layers=2", "model.dense_hidden=32",
                              "model.attention.num_heads=2", "model.attention.num_kv_heads=2",
                              "model.attention.head_dim=16", "model.moe.expert_hidden=16"])


def _check(rank, world_size):
    import torch.distributed as dist
    from parallel import init_distributed, parallelize
    from parallel.dispatcher import AllToAllDispatcher
    from train.model import build_model

    def sum_over_ranks(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    for name in SCHEMES:
        cfg = _cfg(name)
        mesh = init_distributed(cfg)
        torch.manual_seed(0)
        ref = build_model(cfg.model).train()
        for _, layer in ref.moe_layers():
            layer.num_devices, layer.count_reducer = 2, sum_over_ranks
        torch.manual_seed(0)
        model = parallelize(build_model(cfg.model), cfg, mesh).train()
        assert all(isinstance(layer.dispatcher, AllToAllDispatcher) for _, layer in model.moe_layers())
        ids = torch.randint(0, 96, (2 * world_size, 17), generator=torch.Generator().manual_seed(1))
        x, y = ids[2 * rank : 2 * rank + 2, :-1], ids[2 * rank : 2 * rank + 2, 1:]
        torch.manual_seed(10 + rank)
        out_ref = ref(x, y)
        torch.manual_seed(10 + rank)
        out = model(x, y)
        torch.testing.assert_close(out.logits, out_ref.logits, atol=ATOL, rtol=RTOL, msg=name)
        torch.testing.assert_close(out.loss, out_ref.loss, atol=ATOL, rtol=RTOL, msg=name)
        assert out.aux_terms.keys() == out_ref.aux_terms.keys()
        for key, term in out_ref.aux_terms.items():
            torch.testing.assert_close(out.aux_terms[key], term, atol=ATOL, rtol=RTOL, msg=f"{name} {key}")
        out.loss.backward()
        out_ref.loss.backward()
        ref_params = dict(ref.named_parameters())
        for pname, p in model.named_parameters():
            if "experts" in pname or p.grad is None:
                continue  # expert gradients also hold the other rank's tokens before the reduction
            torch.testing.assert_close(p.grad, ref_params[pname].grad, atol=ATOL, rtol=RTOL, msg=f"{name} {pname}")


def test_every_scheme_under_expert_parallelism():
    run_distributed(_check, 2)

"""Expert parallelism on the newer architectures' features against a single-process reference on the same global
batch: Qwen1.5-MoE's gated shared expert and q/k/v biases, Qwen3-MoE's per-head q/k norm with renormalised
top-k, Grok-1's post-sublayer norms, soft-capped attention, multipliers and GELU-gated experts, and the
Llama-4-like interleave of dense and MoE layers with sigmoid top-1 routing. Compared over two AdamW steps:
logits, losses (mean over ranks), every reduced gradient and the parameters after the steps.
(`test_expert_parallel.py` covers the DeepSeek-V3 features, device limits and checkpointing in depth.)"""
import pytest
import torch

from tests.distributed._spawn import run_distributed

B_LOCAL, S = 2, 8
ATOL = RTOL = 1e-5
SMALL = ["model.vocab_size=96", "model.d_model=48", "model.num_layers=2", "model.dense_hidden=64",
         "model.moe.expert_hidden=16", "model.moe.expert_balance_coef=0.01", "trainer.device=cpu"]


def _check(rank, world_size, name, ep_size):
    from parallel import init_distributed, parallelize, reduce_gradients
    from train.config import load_train_config
    from train.model import build_model
    from train.model.moe.experts import GroupedExperts

    cfg = load_train_config([f"model={name}", f"parallel.ep_size={ep_size}", *SMALL])
    mesh = init_distributed(cfg)
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    for _, layer in ref.moe_layers():
        layer.num_devices = ep_size
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), cfg, mesh)
    assert len(list(model.moe_layers())) >= 1
    ref_params = dict(ref.named_parameters())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)

    def expert_slice(pname, t):
        mod = model.get_submodule(pname.rsplit(".", 1)[0])
        if isinstance(mod, GroupedExperts):
            local = mod.placement.local_range
            return t[local.start : local.stop]
        return t

    for step in range(2):
        g = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(0, 96, (B_LOCAL * world_size, S + 1), generator=g)
        x, y = ids[:, :-1], ids[:, 1:]
        out_ref, out = ref(x, y), model(x[mine], y[mine])
        out_ref.loss.backward()
        out.loss.backward()
        torch.testing.assert_close(out.logits, out_ref.logits[mine], atol=ATOL, rtol=RTOL)
        reduce_gradients(model, mesh)
        for pname, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expert_slice(pname, ref_params[pname].grad), atol=ATOL, rtol=RTOL,
                                       msg=f"grad {pname} step {step}")
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p, expert_slice(pname, ref_params[pname]), atol=ATOL, rtol=RTOL, msg=pname)


@pytest.mark.parametrize("name", ["tiny_qwen15_moe", "tiny_qwen3_moe", "tiny_grok1", "tiny_llama4"])
def test_new_architectures_match_single_process_reference(name):
    run_distributed(_check, 2, name, 2)

"""Permutation helpers, LocalDispatcher, capacity dropping and grouped experts on hand-worked cases.

Shape legend: T tokens, D model dim, K active experts, E experts, N routed rows.
"""
import pytest
import torch

from tests.expert_ref import expert_ffn
from train.model.moe import (
    GroupedExperts,
    LocalDispatcher,
    combine_rows,
    drop_over_capacity,
    expert_capacity,
    gather_rows,
    grouped_mm,
    grouped_mm_supported,
    looped_mm,
    sort_by_expert,
)

# flat assignment t*K+k -> expert: 0:2 1:0 2:1 3:2 4:0 5:dropped
IDS_TK = torch.tensor([[2, 0], [1, 2], [0, -1]])


def test_sort_by_expert_hand_worked():
    perm_N, counts_E = sort_by_expert(IDS_TK, 3)
    assert perm_N.tolist() == [1, 4, 2, 0, 3]  # expert 0: flat 1, 4; expert 1: 2; expert 2: 0, 3
    assert counts_E.tolist() == [2, 1, 2]


def test_sort_by_expert_zero_token_expert():
    perm_N, counts_E = sort_by_expert(torch.tensor([[3, 0], [0, 3]]), 4)
    assert perm_N.tolist() == [1, 2, 0, 3] and counts_E.tolist() == [2, 0, 0, 2]


def test_gather_and_combine_hand_worked():
    x_TD = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    perm_N, _ = sort_by_expert(IDS_TK, 3)
    x_ND = gather_rows(x_TD, perm_N, 2)
    assert x_ND[:, 0].tolist() == [1.0, 3.0, 2.0, 1.0, 2.0]  # tokens 0, 2, 1, 0, 1
    w_TK = torch.tensor([[0.5, 0.25], [2.0, 3.0], [4.0, 9.0]])
    y_ND = torch.arange(5.0).unsqueeze(-1).expand(5, 2)  # row n outputs n
    y_TD = combine_rows(y_ND, perm_N, w_TK)
    # token 0: slot0 (expert 2) is row 3, slot1 (expert 0) is row 0 -> 0.5*3 + 0.25*0
    # token 1: slot0 (expert 1) row 2, slot1 (expert 2) row 4 -> 2*2 + 3*4; token 2: slot0 row 1 -> 4*1, slot1 dropped
    assert y_TD[:, 0].tolist() == [1.5, 16.0, 4.0]


def test_local_dispatcher_round_trip():
    torch.manual_seed(0)
    x_TD = torch.randn(6, 4)
    ids_TK = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, -1], [2, 1]])
    w_TK = torch.rand(6, 2)
    d = LocalDispatcher(3)
    x_ND, counts_E = d.dispatch(x_TD, ids_TK, w_TK)
    assert counts_E.tolist() == [3, 5, 3] and d.stats["a2a_tokens_sent"] == 0
    y_TD = d.combine(x_ND * 2)  # "expert" = doubling
    ref = torch.stack([sum(2 * w_TK[t, k] * x_TD[t] for k in range(2) if ids_TK[t, k] >= 0) for t in range(6)])
    assert torch.allclose(y_TD, ref)
    with pytest.raises(RuntimeError):
        d.combine(x_ND)


def test_dropless_dispatch_skips_the_cut_and_agrees():
    """`may_drop=False` (a dropless plan) returns the same rows and output as the cutting path, without reading
    the kept count on the host; every scheme that can leave a slot empty says so."""
    torch.manual_seed(0)
    x_TD, ids_TK, w_TK = torch.randn(5, 4), torch.tensor([[0, 2], [1, 2], [2, 0], [0, 1], [1, 0]]), torch.rand(5, 2)
    outs = []
    for may_drop in (True, False):
        d = LocalDispatcher(3)
        x_ND, counts_E = d.dispatch(x_TD, ids_TK, w_TK, may_drop)
        outs.append((x_ND, counts_E, d.combine(x_ND * 3)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    from train.model.moe.routers import ROUTERS

    leaves_empty = {name for name, cls in ROUTERS.items() if not cls.fills_every_slot}
    assert leaves_empty == {"gshard", "expert_choice"}


def test_capacity_hand_worked():
    assert expert_capacity(4, 2, 2, 0.5) == 2
    assert expert_capacity(5, 2, 4, 1.0) == 3  # ceil(2.5)
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    # expert 0 gets flat 0, 2, 5, 6 and keeps 0, 2; expert 1 gets 1, 3, 4, 7 and keeps 1, 3 (earlier tokens win)
    assert drop_over_capacity(ids, 2, 2).tolist() == [[0, 1], [0, 1], [-1, -1], [-1, -1]]
    assert drop_over_capacity(ids, 2, 3).tolist() == [[0, 1], [0, 1], [1, 0], [-1, -1]]
    assert drop_over_capacity(torch.tensor([[1, -1], [1, 0]]), 2, 1).tolist() == [[1, -1], [-1, 0]]


@pytest.mark.parametrize("d_model,hidden", [(16, 8), (6, 5)])  # grouped-GEMM kernel / loop fallback
def test_grouped_experts_match_per_expert_loop(d_model, hidden):
    torch.manual_seed(0)
    ex = GroupedExperts(4, d_model, hidden)
    counts_E = torch.tensor([3, 0, 2, 4])  # expert 1 gets no rows
    x_ND = torch.randn(9, d_model, requires_grad=True)
    y_ND = ex(x_ND, counts_E)
    rows, ref = 0, []
    for e, n in enumerate(counts_E.tolist()):
        xe = x_ND[rows : rows + n]
        ref.append(expert_ffn(ex, e, xe))
        rows += n
    assert torch.allclose(y_ND, torch.cat(ref), atol=1e-6)
    y_ND.sum().backward()  # an expanded (stride-0) gradient must work on the kernel path too
    assert ex.w_gate_up_EHD.grad[1].abs().sum() == 0 and ex.w_gate_up_EHD.grad[0].abs().sum() > 0
    assert x_ND.grad.shape == x_ND.shape


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_and_loop_paths_agree_with_gradients(dtype, tol):
    """The grouped kernel, the loop oracle and plain per-expert matmuls: outputs and gradients, with an expert
    that gets no rows and two trailing (dropped) rows that no expert computes."""
    torch.manual_seed(0)
    x0, w0, c = torch.randn(9, 16, dtype=dtype), torch.randn(3, 8, 16, dtype=dtype), torch.tensor([2, 0, 5])
    dy = torch.randn(7, 8, dtype=dtype)
    results = []
    for gemm in (grouped_mm, looped_mm, None):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if gemm is None:
            y = torch.cat([x[:2] @ w[0].t(), x[2:7] @ w[2].t()])
        else:
            y = gemm(x, w, c)[:7]  # rows 7, 8 lie past the last expert's block
        (y * dy).sum().backward()
        results.append((y, x.grad[:7], w.grad))
    assert grouped_mm_supported(x0, w0)  # the first really is the kernel
    for got in results[:2]:
        for a, b in zip(got, results[2]):
            torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    assert grouped_mm(torch.randn(0, 16), w0.float(), torch.zeros(3, dtype=torch.long)).shape == (0, 8)


def test_fused_gate_up_equals_separate_projections():
    """One GEMM over [W_gate; W_up] equals the two projections computed apart (`expert_ffn`), gradients too."""
    torch.manual_seed(0)
    ex = GroupedExperts(3, 16, 8)
    x = torch.randn(6, 16, requires_grad=True)
    c = torch.tensor([1, 2, 3])
    y = ex(x, c)
    ref = torch.cat([expert_ffn(ex, e, xe) for e, xe in enumerate(torch.split(x, c.tolist()))])
    torch.testing.assert_close(y, ref)
    g_fused = torch.autograd.grad(y.square().sum(), [x, ex.w_gate_up_EHD, ex.w_down_EDF])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, ex.w_gate_up_EHD, ex.w_down_EDF])
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b)


def test_grouped_experts_compile_fp32_forward_backward():
    # torch._grouped_mm's fake-tensor kernel accepts bf16 only: compiled fp32 must take the per-expert loop
    # (trainer.compile=true failed at tracing before). aot_eager traces forward and backward without inductor's
    # C++ build, which keeps this test at a few seconds.
    torch._dynamo.reset()
    torch.manual_seed(0)
    ex = GroupedExperts(4, 16, 8)  # aligned widths: eager fp32 on CPU takes the grouped kernel
    counts_E = torch.tensor([3, 0, 2, 4])
    x_ND = torch.randn(9, 16, requires_grad=True)
    ref = ex(x_ND, counts_E)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in (x_ND, *ex.parameters())]
    for p in (x_ND, *ex.parameters()):
        p.grad = None
    y = torch.compile(ex, backend="aot_eager")(x_ND, counts_E)
    y.square().sum().backward()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip([p.grad for p in (x_ND, *ex.parameters())], ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()

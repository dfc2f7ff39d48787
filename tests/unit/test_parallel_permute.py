"""Hand-worked index checks of the expert-parallel permutation helpers (one process, no communication)."""
import torch

from parallel.permute import copy_weights, plan_send, sum_rows_into
from train.model.moe.placement import ExpertPlacement


def _t(x):
    return torch.tensor(x, dtype=torch.int64)


def test_expert_owner_blocks_and_dropped():
    # E=6 over 3 ranks: experts {0,1}→0, {2,3}→1, {4,5}→2
    assert ExpertPlacement(6, 3).owner_of(_t([[0, 5], [3, -1]])).tolist() == [[0, 2], [1, -1]]


def test_plan_send_deduplicates_per_rank():
    # E=4, R=2, E_loc=2. token 0: experts 3,0 → ranks 1,0. token 1: 2,3 → rank 1 only (ONE copy).
    # token 2: 1,0 → rank 0 only. token 3: -1,-1 → nowhere.
    ids = _t([[3, 0], [2, 3], [1, 0], [-1, -1]])
    p = plan_send(ids, ExpertPlacement(4, 2))
    # copies ordered by (rank, token): rank 0 ← tokens 0, 2; rank 1 ← tokens 0, 1
    assert p.copy_rank_C.tolist() == [0, 0, 1, 1]
    assert p.copy_token_C.tolist() == [0, 2, 0, 1]
    assert p.send_counts_R.tolist() == [2, 2]
    assert p.local_ids_CK.tolist() == [[-1, 0], [1, 0], [1, -1], [0, 1]]
    assert p.devices_per_token_T.tolist() == [2, 1, 1, 0]


def test_plan_send_partial_drop_and_empty_rank():
    # E=6, R=3, E_loc=2: nothing goes to rank 1; token 1 keeps only its slot 1.
    ids = _t([[5, 4], [-1, 0]])
    p = plan_send(ids, ExpertPlacement(6, 3))
    assert p.send_counts_R.tolist() == [1, 0, 1]
    assert p.copy_token_C.tolist() == [1, 0]
    assert p.local_ids_CK.tolist() == [[-1, 0], [1, 0]]


def test_copy_weights_masks_slots_elsewhere_and_is_differentiable():
    ids = _t([[3, 0], [2, 3]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4]], requires_grad=True)
    p = plan_send(ids, ExpertPlacement(4, 2))  # copies: (r0,t0) (r1,t0) (r1,t1)
    w_CK = copy_weights(w, p)
    assert torch.equal(w_CK, torch.tensor([[0.0, 0.3], [0.7, 0.0], [0.6, 0.4]]))
    w_CK.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_sum_rows_into():
    rows = torch.tensor([[1.0], [2.0], [4.0]])
    assert sum_rows_into(rows, _t([2, 0, 2]), 4).tolist() == [[2.0], [0.0], [5.0], [0.0]]


def test_receiving_side_reuses_local_sort():
    """Received copies with local ids are fanned out by the model's own `sort_by_expert`: rows (copy, slot)
    grouped by local expert, stable within an expert."""
    from train.model.moe.dispatch import sort_by_expert

    ids = _t([[1, -1], [0, 1], [-1, 1], [-1, 0]])  # q0→e1; q1→e0,e1; q2→e1; q3→e0 (slot 1)
    perm_N, counts = sort_by_expert(ids, 3)
    # expert 0: (q1,s0)=2, (q3,s1)=7; expert 1: (q0,s0)=0, (q1,s1)=3, (q2,s1)=5; expert 2: none
    assert perm_N.tolist() == [2, 7, 0, 3, 5]
    assert counts.tolist() == [2, 3, 0]

"""FP8 recipes: scales equal torchao's, emulated GEMMs equal torchao's Float8Linear on CPU, blockwise tiles, the
expert GEMM, group padding, and which modules each recipe converts."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from train.config import Fp8Recipe, load_train_config
from train.model import MoETransformer
from train.model.loss_head import OutputHead
from train.model.moe.experts import grouped_mm
from train.precision.fp8 import convert_to_fp8
from train.precision.fp8.emulated import EmulatedFp8Linear, emulated_fp8_grouped_mm
from train.precision.fp8.grouped import Fp8GroupedGemm, pad_groups
from train.precision.fp8.scaling import E4M3, quantize_blocks

torchao_float8 = pytest.importorskip("torchao.float8")
from torchao.float8.config import ScalingGranularity  # noqa: E402
from torchao.float8.float8_utils import tensor_to_scale  # noqa: E402

RECIPES = list(Fp8Recipe)
TORCHAO_RECIPES = [Fp8Recipe.tensorwise, Fp8Recipe.rowwise]


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_tensorwise_and_rowwise_scales_equal_torchao():
    x = _x(24, 64) * 3
    _, s = quantize_blocks(x, (None, None), E4M3)
    assert torch.equal(s.view(()), tensor_to_scale(x, E4M3))
    _, s = quantize_blocks(x, (1, None), E4M3, pow2=True)
    ref = tensor_to_scale(x, E4M3, scaling_granularity=ScalingGranularity.AXISWISE, axiswise_dim=-1,
                          round_scales_to_power_of_2=True)
    assert torch.equal(s, ref)  # (24, 1): one power-of-2 scale per row
    assert torch.equal(torch.log2(s), torch.log2(s).round())


@pytest.mark.parametrize("recipe", TORCHAO_RECIPES)
def test_emulated_linear_equals_torchao_float8_linear(recipe, one_thread):
    """One expert of the emulated grouped GEMM is torchao's Float8Linear (same recipe), forward and backward."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    linear = nn.Linear(64, 48, bias=False)
    ours_w = nn.Parameter(linear.weight.detach().clone())
    theirs = Float8Linear.from_float(copy.deepcopy(linear), config=Float8LinearConfig.from_recipe_name(recipe.value))
    x = (_x(40, 64) * 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    gy = _x(40, 48, seed=1)

    y = emulated_fp8_grouped_mm(x, ours_w.unsqueeze(0), torch.tensor([40]), recipe)
    y_ref = theirs(x2)
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_w.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)
    hp = x.detach() @ linear.weight.detach().T
    assert not torch.allclose(y, hp, rtol=1e-4, atol=1e-4)  # it did quantise


def test_rowwise_grouped_gemm_is_torchao_float8_linear_per_expert(one_thread):
    """Rowwise scales never cross an expert's rows, so each expert's block equals its own Float8Linear, including
    the weight gradient, whose column scales are per expert group."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    counts = [5, 0, 19, 8]
    w = _x(4, 32, 48, seed=2) * 0.1
    x = _x(sum(counts), 48, seed=3).requires_grad_()
    wp = nn.Parameter(w.clone())
    y = emulated_fp8_grouped_mm(x, wp, torch.tensor(counts), Fp8Recipe.rowwise)
    gy = _x(*y.shape, seed=4)
    (y * gy).sum().backward()
    config = Float8LinearConfig.from_recipe_name("rowwise")
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.equal(wp.grad[e], torch.zeros_like(wp.grad[e]))
            continue
        linear = nn.Linear(48, 32, bias=False)
        linear.weight.data.copy_(w[e])
        ref = Float8Linear.from_float(linear, config=config)
        xe = x.detach()[start:start + n].clone().requires_grad_()
        ye = ref(xe)
        (ye * gy[start:start + n]).sum().backward()
        torch.testing.assert_close(y[start:start + n], ye, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad[start:start + n], xe.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wp.grad[e], ref.weight.grad, rtol=1e-5, atol=1e-5)
        start += n


def test_blockwise_scales_are_per_tile_and_per_block():
    """One outlier per 1x128 activation tile / 128x128 weight block sets exactly that tile's scale; every other
    value is dequantised within e4m3's relative precision (3 mantissa bits: half an ulp is 2^-4)."""
    x = torch.rand(4, 256) * 0.5 + 0.5  # in [0.5, 1): scaled values stay in e4m3's normal range
    outliers = torch.tensor([[2.0, 3.0], [5.0, 7.0], [11.0, 13.0], [17.0, 19.0]])
    for r in range(4):
        for t in range(2):
            x[r, t * 128 + 17 * (r + 1)] = outliers[r, t]
    dq, s = quantize_blocks(x, (1, 128), E4M3)
    assert s.shape == (4, 2)
    torch.testing.assert_close(s, 448.0 / outliers)
    assert ((dq - x).abs() <= x.abs() * 2.0 ** -4 + 1e-7).all()

    w = torch.rand(256, 384) * 0.5 + 0.5
    block_max = torch.arange(1, 7, dtype=torch.float32).view(2, 3) * 4
    for i in range(2):
        for j in range(3):
            w[i * 128 + 5 * j, j * 128 + 3 * i] = block_max[i, j]
    dq, s = quantize_blocks(w, (128, 128), E4M3)
    assert s.shape == (2, 3)
    torch.testing.assert_close(s, 448.0 / block_max)
    assert ((dq - w).abs() <= w.abs() * 2.0 ** -4 + 1e-7).all()
    # the same weights stacked per expert get their own blocks
    _, s3 = quantize_blocks(torch.stack([w, 2 * w]), (128, 128), E4M3)
    torch.testing.assert_close(s3, torch.stack([s, s / 2]))


def test_blockwise_partial_tiles():
    """Dims that are not multiples of 128 get partial edge tiles (the tiny models' 64-wide experts)."""
    x = _x(3, 200)
    dq, s = quantize_blocks(x, (1, 128), E4M3)
    assert s.shape == (3, 2)
    torch.testing.assert_close(s[:, 1], 448.0 / x[:, 128:].abs().amax(dim=1))
    assert ((dq - x).abs() <= x.abs() * 2.0 ** -4 + 2.0 ** -9 / s.min()).all()


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_expert_gemm_is_close_to_the_high_precision_one(recipe, one_thread):
    counts = torch.tensor([7, 0, 12, 3])
    w = (_x(4, 32, 64, seed=5) * 0.05).requires_grad_()
    x = _x(22, 64, seed=6).requires_grad_()
    gemm = Fp8GroupedGemm(recipe, torch.device("cpu"))
    assert gemm.kernel == f"emulated {recipe.value} grouped gemm"
    y = gemm(x, w, counts)
    y_hp = torch.cat([c @ w[e].T for e, c in enumerate(torch.split(x, counts.tolist()))])
    gy = _x(*y.shape, seed=7)
    gx, gw = torch.autograd.grad((y * gy).sum(), (x, w))
    gx_hp, gw_hp = torch.autograd.grad((y_hp * gy).sum(), (x, w))
    for ours, ref in ((y, y_hp), (gx, gx_hp), (gw, gw_hp)):
        assert not torch.equal(ours, ref)
        assert (ours - ref).norm() / ref.norm() < 0.1  # e4m3 (e5m2 for tensorwise grads): a few percent
    assert torch.equal(gw[1], torch.zeros_like(gw[1]))  # an expert with no rows gets no gradient


def test_fp8_gemm_under_autocast_returns_bf16(one_thread):
    x, w = _x(8, 32), _x(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = emulated_fp8_grouped_mm(x, w, torch.tensor([3, 5]), Fp8Recipe.blockwise)
    assert y.dtype == torch.bfloat16


def test_pad_groups_hand_worked():
    counts = torch.tensor([3, 0, 17, 16])
    x = torch.arange(36, dtype=torch.float32).view(36, 1).requires_grad_()
    x_pad, rows, padded = pad_groups(x, counts, 16)
    assert padded.tolist() == [16, 0, 32, 16]
    assert rows.tolist() == [0, 1, 2, *range(16, 33), *range(48, 64)]
    assert x_pad.shape == (64, 1)
    assert x_pad[3:16].eq(0).all() and x_pad[33:48].eq(0).all()
    assert torch.equal(x_pad.index_select(0, rows), x)
    (x_pad.index_select(0, rows) * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    # rows past the last group (dropped, masked by the dispatcher) go after every padded group
    x_pad, rows, _ = pad_groups(torch.ones(6, 1), torch.tensor([2, 1]), 16)
    assert rows.tolist() == [0, 1, 16, 32, 33, 34] and x_pad.shape == (35, 1)


def test_rows_past_the_last_group_are_zero_and_enter_no_scale(one_thread):
    x, w = _x(10, 32), _x(2, 16, 32)
    counts = torch.tensor([3, 4])
    y = emulated_fp8_grouped_mm(x, w, counts, Fp8Recipe.tensorwise)
    assert torch.equal(y[7:], torch.zeros(3, 16))
    x_big = x.clone()
    x_big[7:] = 1e4  # a huge dropped row must not change the tensor-wide scale of the others
    assert torch.equal(emulated_fp8_grouped_mm(x_big, w, counts, Fp8Recipe.tensorwise), y)


def test_emulated_linear_keeps_parameters_and_bias(one_thread):
    linear = nn.Linear(64, 32)
    fp8 = EmulatedFp8Linear.from_linear(linear, Fp8Recipe.blockwise)
    assert fp8.weight is linear.weight and fp8.bias is linear.bias
    x = _x(2, 5, 64)
    y, y_hp = fp8(x), linear(x)
    assert (y - y_hp).norm() / y_hp.norm() < 0.05 and not torch.equal(y, y_hp)
    assert fp8(x).shape == (2, 5, 32)


def _tiny(overrides=()):
    cfg = load_train_config(["model=tiny_deepseek_v3", "model.vocab_size=512", *overrides]).model
    torch.manual_seed(0)
    return MoETransformer(cfg)


@pytest.mark.parametrize("recipe", RECIPES)
def test_conversion_keeps_embedding_head_gates_norms_and_mtp(recipe, one_thread):
    from torchao.float8.float8_linear import Float8Linear

    model = _tiny()
    assert model.cfg.mtp_depth == 1
    before = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    report = convert_to_fp8(model, recipe, torch.device("cpu"))
    fp8_type = EmulatedFp8Linear if recipe is Fp8Recipe.blockwise else Float8Linear
    converted = {n for n, m in model.named_modules() if isinstance(m, fp8_type)}
    assert converted == set(report.converted)
    layer0 = model.layers[0]
    expected = {f"layers.{i}.attn.{p}" for i in range(4)
                for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    expected |= {f"layers.0.ffn.{p}" for p in ("w_gate", "w_up", "w_down")}  # the first (dense) layer
    expected |= {f"layers.{i}.ffn.shared.{p}" for i in (1, 2, 3) for p in ("w_gate", "w_up", "w_down")}
    assert converted == expected
    assert type(layer0.attn.q_a_proj) is fp8_type
    assert type(model.lm_head) is OutputHead and type(model.embed) is nn.Embedding  # not swapped for an FP8 linear
    for i in (1, 2, 3):
        assert type(model.layers[i].ffn.router.gate) is nn.Linear
    assert not any(isinstance(m, fp8_type) for m in model.mtp.modules())
    assert report.kept["output head"] == ["lm_head"] and report.kept["embedding"] == ["embed"]
    assert report.kept["router"] == [f"layers.{i}.ffn.router.gate" for i in (1, 2, 3)]
    assert "mtp.0.eh_proj" in report.kept["MTP module"] and "mtp.0.block.ffn.router.gate" in report.kept["MTP module"]
    # the routed experts of the main MoE layers get the FP8 gemm; the MTP block's stay high precision
    assert report.experts == [f"layers.{i}.ffn.experts" for i in (1, 2, 3)]
    assert all(isinstance(model.layers[i].ffn.experts.gemm, Fp8GroupedGemm) for i in (1, 2, 3))
    assert model.mtp[0].block.ffn.experts.gemm is grouped_mm
    # same Parameters, names and state-dict keys: checkpoints and the optimizer see no change
    assert {n: p for n, p in model.named_parameters()} == before
    assert list(model.state_dict()) == keys
    assert f"recipe={recipe.value}" in report.summary()


def test_shared_expert_gate_and_unaligned_linears_stay_high_precision(one_thread):
    cfg = load_train_config(["model=tiny_qwen15_moe", "model.vocab_size=512"]).model
    model = MoETransformer(cfg)
    report = convert_to_fp8(model, Fp8Recipe.rowwise, torch.device("cpu"))
    gates = [n for n, _ in model.named_modules() if n.endswith("shared_gate")]
    assert gates and report.kept["shared-expert gate"] == gates
    assert all(type(model.get_submodule(n)) is nn.Linear for n in gates)

    odd = nn.Sequential(nn.Linear(32, 24), nn.Linear(24, 32), nn.Linear(32, 32))
    report = convert_to_fp8(odd, Fp8Recipe.tensorwise, torch.device("cpu"))
    assert report.kept["dims not multiples of 16"] == ["0", "1"] and report.converted == ["2"]


@pytest.mark.parametrize("recipe", [Fp8Recipe.rowwise, Fp8Recipe.blockwise])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_fp8_gradients(recipe, mode, one_thread):
    """Converting after activation checkpointing is applied (the trainer's order) gives the gradients of the
    converted model without checkpointing."""
    from parallel.activation_checkpointing import apply_activation_checkpointing

    grads = []
    for ac in ("none", mode):
        model = _tiny(["model.num_layers=2", "model.mtp_depth=0"])
        apply_activation_checkpointing(model, ac)
        convert_to_fp8(model, recipe, torch.device("cpu"))
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels_BT=ids)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_builds_on_bf16(recipe, one_thread):
    """precision=fp8 through the build pipeline: bf16's converter, then the FP8 swap, no autocast. The FP8 GEMMs take
    bf16 inputs and give bf16 outputs (the residual stream stays bf16), the embedding, head and experts compute on
    bf16 copies, routers stay fp32, and every gradient reaches its fp32 master; the loss stays within 2% of bf16's."""
    from torchao.float8.float8_linear import Float8Linear

    from parallel import Mesh
    from train.build import EngineArgs, build_model
    from train.precision import build_precision
    from train.precision.bf16 import Bf16Embedding, Bf16GroupedExperts, Bf16OutputHead

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = {}
    for precision in ("bf16", "fp8"):
        extra = [f"precision.recipe={recipe.value}"] if precision == "fp8" else []
        cfg = load_train_config(["model=tiny_deepseek_v3", "model.vocab_size=512", f"precision={precision}", *extra])
        assert build_precision(cfg.precision, torch.device("cpu")).autocast_dtype is None
        built = build_model(cfg, Mesh(), init_seed=3, engine_args=EngineArgs(accum_steps=1))
        model = built.model
        block_in = set()
        for block in model.blocks():
            block.register_forward_pre_hook(lambda m, args: block_in.add(args[0].dtype))
        out = built.engine.forward(ids, ids)
        built.engine.backward(out.loss)
        losses[precision] = out.loss.item()
        assert block_in == {torch.bfloat16} and out.logits.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in model.parameters())
    fp8_type = EmulatedFp8Linear if recipe is Fp8Recipe.blockwise else Float8Linear
    assert type(model.layers[1].attn.o_proj) is fp8_type
    assert type(model.embed) is Bf16Embedding and type(model.lm_head) is Bf16OutputHead
    experts = model.layers[1].ffn.experts
    assert type(experts) is Bf16GroupedExperts and isinstance(experts.gemm, Fp8GroupedGemm)
    assert type(model.layers[1].ffn.router.gate) is nn.Linear and model.layers[1].ffn.router.gate.weight.grad is not None
    assert losses["fp8"] != losses["bf16"] and losses["fp8"] == pytest.approx(losses["bf16"], rel=2e-2)

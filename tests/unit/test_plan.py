"""The memory planner (`python -m train.plan`): hand-worked arithmetic, activations against the bytes autograd really
saves (saved-tensor hooks, every tiny family, fp32 and bf16_autocast), every activation-checkpointing mode against
the real `parallel/activation_checkpointing.py` (kept activations and backward's recompute), the CLI contract on a
full-size config, and input errors. Parameters, gradients and optimizer state against what DeepSpeed and stage 0
really hold are checked with 4 ranks in tests/distributed/test_zero.py (`_planner_agrees`)."""
import json
import subprocess
import sys

import pytest
import torch

from parallel.activation_checkpointing import apply_activation_checkpointing
from train.plan.state import state_bytes
from train.config import load_train_config
from train.plan import Shapes, activation_bytes, plan_memory
from train.plan.cli import main, parse_bytes
from train.plan.fit import layout_config, smallest_fitting_layout
from train.plan.measure import alive_tensor_bytes, recompute_peak_bytes, saved_tensor_bytes

KEYS = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes", "fits")
V3 = ["model=deepseek_v3", "parallel.world_size=256", "parallel.ep_size=64", "trainer.micro_batch_size=1",
      "trainer.seq_len=4096"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5 TB") == 1.5e12
    assert parse_bytes("123456") == 123456
    for bad in ("80XB", "-1GB", "GB", "", "80 G B"):
        with pytest.raises(ValueError, match="expected a positive size"):
            parse_bytes(bad)


def test_state_bytes_by_hand():
    # one rank's optimizer groups: [10, 6] (a 10-element expert tensor and a dense one), [4] (dense)
    groups, experts = [[10, 6], [4]], [[True, False], [False]]
    assert state_bytes(groups, experts, 0, 4, 1) == {  # whole; 2 moments + a step counter per tensor
        "params": 80, "grads": 80, "grads_partition": 80, "optimizer": 160 + 12}
    # ep=1, W=4: every tensor dense. Flat groups of 16 and 4 elements padded to multiples of 2·4 -> partitions of
    # 4 and 2; optimizer = 3 x 6 elements + 2 step counters.
    s1 = state_bytes(groups, experts, 1, 4, 1)
    assert s1 == {"params": 80, "grads": 80, "grads_partition": 24, "optimizer": 4 * (18 + 2)}
    # stage 2: rank 2's partition [8, 12) overlaps both tensors of group 0 (16 elements), and the 4-element
    # group's partitions [4, 6), [6, 8) hold only padding: 64 B, the worst rank (rank 0: 10 + 4 elements).
    assert state_bytes(groups, experts, 2, 4, 1)["grads"] == 64
    # stage 3: each tensor partitioned alone, ceil(10/4) + ceil(6/4) + ceil(4/4) = 6 elements; DeepSpeed keeps
    # tensors under the persistence threshold whole as well
    assert state_bytes(groups, experts, 3, 4, 1, persistence_threshold=0) == {
        "params": 24, "grads": 24, "grads_partition": 24, "optimizer": 4 * (18 + 2)}
    assert state_bytes(groups, experts, 3, 4, 1)["params"] == 24 + 80
    # ep=2, W=4: the expert tensor goes to its own group over its EDP group of 2 ranks (ceil(10/4)·2 = 6 elements)
    # and the dense ones stay over 4 ranks (groups of 6 and 4 elements: partitions of 2 and 2)
    assert state_bytes(groups, experts, 1, 4, 2)["grads_partition"] == 4 * (2 + 2 + 6)


def _one_dense_layer():
    return load_train_config([
        "model=tiny_mixtral", "model.num_layers=1", "model.moe.first_k_dense=1", "model.d_model=8",
        "model.attention.num_heads=2", "model.attention.num_kv_heads=2", "model.attention.head_dim=4",
        "model.dense_hidden=16", "model.vocab_size=10", "data.tokenizer_vocab_size=10"])


def _checkpointed(model_cfg, mode: str):
    from train.model import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    apply_activation_checkpointing(model, mode)
    return model


def _measured_model(name: str, precision: str, mode: str = "none", overrides: tuple = ()):
    """The tiny model under `precision` and checkpointing `mode`, and the autocast dtype to measure it under.
    `precision=bf16` goes through the build pipeline (its converter swaps the modules) and runs once first, so its
    bf16 weight copies are cast (state held across the step, left out of the measure with the parameters)."""
    from train.build import build_model
    from parallel import Mesh

    cfg = load_train_config([f"model={name}", f"precision={precision}", *overrides])
    if precision not in ("bf16", "fp8"):
        return cfg, _checkpointed(cfg.model, mode), torch.bfloat16 if precision == "bf16_autocast" else None
    cfg = load_train_config([f"model={name}", f"precision={precision}", f"trainer.activation_checkpointing={mode}",
                             *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, Mesh(), init_seed=0, stop_after="load").model.train()
    with torch.no_grad():  # with labels, so that MTP's modules run (and cast) too
        ids = torch.zeros(1, 8, dtype=torch.long)
        model(ids, ids)
    return cfg, model, None


def _saved_in_blocks(model, input_ids_BT, labels_BT, autocast_dtype) -> int:
    """Bytes of the distinct storages autograd saves inside the transformer blocks (MTP's included), `none` mode:
    the part `parts["blocks"]` plans."""
    from train.plan.measure import _autocast, _weights

    own, inside, seen, alive = set(_weights(model)), [False], {}, []
    for block in model.blocks():
        block.register_forward_pre_hook(lambda m, args: inside.__setitem__(0, True))
        block.register_forward_hook(lambda m, args, out: inside.__setitem__(0, False))

    def pack(t):
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in own and storage.nbytes():
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        alive.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(input_ids_BT, autocast_dtype):
        model(input_ids_BT, labels_BT)
    return sum(seen.values())


def test_activations_by_hand():
    """One dense layer, B=1, T=4 (t=4 tokens), D=8, 2 heads of 4, F=16, V=10, fp32; bytes:
    ids 32 | block input 128 | attn norm: 1/rms 16, normalised 128, output 128 | RoPE cos+sin 4·4·4 = 64 |
    q, k, v, attention output, o_proj input 5 x 128, log-sum-exp 1·2·4·4 = 32 | residual 128, 1/rms 16,
    normalised 128, output 128 | SwiGLU gate, silu, up, product 4·4·16·4 = 1024 | final norm: block output 128,
    1/rms 16, normalised 128, output 128 | log-probs 4·10·4 = 160 | targets 32.
    `selective` keeps the projection outputs q, k, v, o (4 x 128), the SwiGLU's input 128, its gate and up
    outputs 2 x 256 and down output 128, and recomputes the rest of `Block.token_mixing` (1,152, the largest
    region); `full` recomputes the whole block (2,432)."""
    cfg = _one_dense_layer()
    acts = activation_bytes(cfg.model, Shapes(batch=1, seq_len=4, bf16=False, device_type="cpu"))
    outside = 32 + (128 + 16 + 128 + 128) + 160 + 32
    assert acts["by_mode"] == {
        "none": 3184,
        "full": outside + 128,  # the block input only
        "selective": outside + 128 + 4 * 128 + 128 + 2 * 256 + 128,
    }
    assert acts["recompute_by_mode"] == {"none": 0, "full": 3184 - outside - 128, "selective": 1152}
    ids = torch.randint(0, 10, (1, 5))
    x, y = ids[:, :-1], ids[:, 1:]
    # the input ids' storage holds one token more; the recompute does not recreate RoPE's 64 B
    assert saved_tensor_bytes(_checkpointed(cfg.model, "none"), x, y) == pytest.approx(3184, rel=0.01)
    assert saved_tensor_bytes(_checkpointed(cfg.model, "full"), x, y) == pytest.approx(outside + 128, rel=0.03)
    assert alive_tensor_bytes(_checkpointed(cfg.model, "selective"), x, y) == pytest.approx(2032, rel=0.02)
    assert recompute_peak_bytes(_checkpointed(cfg.model, "full"), x, y) == pytest.approx(2432, rel=0.03)
    assert recompute_peak_bytes(_checkpointed(cfg.model, "selective"), x, y) == pytest.approx(1152, rel=0.06)


@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast", "bf16"])
@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_dbrx", "tiny_deepseek_moe", "tiny_deepseek_v2",
                                  "tiny_deepseek_v3", "tiny_grok1", "tiny_openmoe", "tiny_qwen15_moe",
                                  "tiny_qwen2_moe", "tiny_qwen3_moe", "tiny_olmoe", "tiny_llama4"])
def test_activations_match_saved_tensors(name, precision):
    """Every tiny family (GQA, clip_qkv + LayerNorm, shared experts, MLA with and without q_lora, sigmoid routing
    and MTP; Grok-1's post-norms and soft-capped attention, Qwen's gated shared expert, per-head and full q/k
    norms, interleaved MoE layers) in one CPU process: the planner's `none` activations within 10% of the measured
    saved storages."""
    cfg, model, dtype = _measured_model(name, precision)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33))
    measured = saved_tensor_bytes(model, ids[:, :-1], ids[:, 1:], dtype)
    planned = activation_bytes(cfg.model, Shapes.of(precision, 2, 32, device_type="cpu"))["by_mode"]["none"]
    assert planned == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast", "bf16"])
@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_deepseek_v3"])
def test_activations_per_checkpointing_mode_match_measured(name, precision):
    """`parallel/activation_checkpointing.py` applied to the real model (sliding-window GQA and softmax top-2; MLA,
    sigmoid routing, a dense first layer and an MTP block), 2 x 64 tokens, one CPU process: the planned activations
    of every mode within 10% of the measured ones, which are autograd's saved storages for `none` and `full` and the
    storages the forward leaves alive for `selective` (its kept matmul outputs sit in the checkpoint's cache)."""
    cfg = load_train_config([f"model={name}", f"precision={precision}"])
    ids = torch.randint(0, cfg.model.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    planned = activation_bytes(cfg.model, Shapes.of(precision, 2, 64, device_type="cpu"))["by_mode"]
    for mode in ("none", "full", "selective"):
        measure = alive_tensor_bytes if mode == "selective" else saved_tensor_bytes
        _, model, dtype = _measured_model(name, precision, mode)
        measured = measure(model, ids[:, :-1], ids[:, 1:], dtype)
        assert planned[mode] == pytest.approx(measured, rel=0.10), mode


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_deepseek_v3"])
def test_bf16_activations_match_and_undercut_autocast(name):
    """precision=bf16 keeps at most 0.6x the activations of bf16_autocast (`none`), measured, and the plan within
    10%: inside the blocks (measured 0.33x for tiny_mixtral, 0.53x for tiny_deepseek_v3, whose CPU math-path MLA
    keeps fp32 scaled q, k, v and T x T probabilities in both), and over the whole model with the loss head in
    chunks (as at any micro-batch over `model.loss_chunk_tokens`, 1,024: 0.33x and 0.52x). By its bf16 residual
    stream, norm outputs and expert rows, norms and router keeping bf16 inputs, and its weight copies held as state.
    With the whole logits (the tiny models' 128 tokens by default) both keep the same fp32 log-softmax, t x V."""
    vocab = load_train_config([f"model={name}"]).model.vocab_size
    ids = torch.randint(0, vocab, (2, 65), generator=torch.Generator().manual_seed(1))
    blocks, total = {}, {}
    for precision in ("bf16_autocast", "bf16"):
        cfg, model, dtype = _measured_model(name, precision)
        blocks[precision] = _saved_in_blocks(model, ids[:, :-1], ids[:, 1:], dtype)
        planned = activation_bytes(cfg.model, Shapes.of(precision, 2, 64, device_type="cpu"))["parts"]["blocks"]
        assert planned == pytest.approx(blocks[precision], rel=0.10), precision
        cfg, model, dtype = _measured_model(name, precision, overrides=("model.loss_chunk_tokens=32",))
        total[precision] = saved_tensor_bytes(model, ids[:, :-1], ids[:, 1:], dtype)
        planned = activation_bytes(cfg.model, Shapes.of(precision, 2, 64, device_type="cpu"))["by_mode"]["none"]
        assert planned == pytest.approx(total[precision], rel=0.10), precision
    assert blocks["bf16"] <= 0.6 * blocks["bf16_autocast"]
    assert total["bf16"] <= 0.6 * total["bf16_autocast"]


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_is_planned_as_bf16(recipe):
    """precision=fp8 builds on bf16 and its FP8 GEMMs (torchao's Float8Linear, the emulated blockwise linear and
    expert GEMMs) save the bf16 inputs a bf16 GEMM saves: bf16's plan within 10% (measured 0.1%)."""
    cfg, model, dtype = _measured_model("tiny_deepseek_v3", "fp8", overrides=(f"precision.recipe={recipe}",))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    measured = saved_tensor_bytes(model, ids[:, :-1], ids[:, 1:], dtype)
    planned = activation_bytes(cfg.model, Shapes.of("fp8", 2, 64, device_type="cpu"))["by_mode"]["none"]
    assert planned == activation_bytes(cfg.model, Shapes.of("bf16", 2, 64, device_type="cpu"))["by_mode"]["none"]
    assert planned == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_deepseek_v3"])
def test_recompute_transient_matches_backward(name):
    """The transient term: the most that backward's recomputation holds at one time (one block for `full`, one
    checkpointed region for `selective`), fp32, within 20% of the measured peak. The plan counts what the recompute
    saves again; the measured peak also holds the intermediates alive at that moment, which on CPU's math-path MLA
    (the concatenated q and k, the attention output before its transpose) are 8% of a block and 17% of a region."""
    cfg = load_train_config([f"model={name}"])
    ids = torch.randint(0, cfg.model.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    planned = activation_bytes(cfg.model, Shapes(2, 64, False, device_type="cpu"))["recompute_by_mode"]
    for mode in ("full", "selective"):
        measured = recompute_peak_bytes(_checkpointed(cfg.model, mode), ids[:, :-1], ids[:, 1:])
        assert planned[mode] == pytest.approx(measured, rel=0.20), mode


def test_checkpointing_orders_the_modes():
    cfg = load_train_config(["model=tiny_deepseek_v3", "trainer.device=cpu"])
    by_mode = plan_memory(cfg, 1)["activations_bytes_by_mode"]
    assert by_mode["full"] < by_mode["selective"] < by_mode["none"]


def test_cli_reads_checkpointing_from_the_training_config(capsys):
    """`trainer.activation_checkpointing` is an ordinary key of the composed config: it picks the activations."""
    assert main(["model=tiny_deepseek_moe", "trainer.activation_checkpointing=selective"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["layout"]["activation_checkpointing"] == "selective"
    assert plan["activations_bytes"] == plan["activations_bytes_by_mode"]["selective"]


@pytest.mark.slow  # builds the 683B-parameter model on the meta device (~10 s on 2 cores)
def test_cli_on_full_size_deepseek_v3():
    """The INTERFACE command: ZeRO-1 keeps whole fp32 weights and gradients of 27.8B local parameters (over 200 GB):
    it cannot fit 80 GB; ZeRO-3 on 512 ranks with full checkpointing does."""
    out = subprocess.run([sys.executable, "-m", "train.plan", *V3, "parallel.zero_stage=1",
                          "--device-memory", "80GB"], capture_output=True, text=True, check=True)
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(k in plan for k in KEYS) and plan["fits"] is False
    assert plan["params_bytes"] > 80e9 and plan["peak_bytes"] > plan["params_bytes"]
    assert "does NOT fit" in out.stdout

    cfg = load_train_config(["model=deepseek_v3", "parallel.ep_size=64", "parallel.zero_stage=3",
                             "precision=bf16_autocast",
                             "trainer.micro_batch_size=1", "trainer.seq_len=4096",
                             "trainer.activation_checkpointing=full"])
    plan = plan_memory(cfg, 512, device_memory=80 * 10**9)
    assert plan["fits"] is True and plan["peak_bytes"] < 0.9 * 80e9
    assert plan["activations_bytes_by_mode"]["none"] > 10 * plan["activations_bytes"]


@pytest.mark.parametrize("args,message", [
    (["model=tiny_deepseek_moe", "parallel.world_size=3", "parallel.ep_size=3"], "not divisible by parallel.ep_size"),
    (["model=tiny_deepseek_moe", "parallel.world_size=6", "parallel.ep_size=4"], "does not divide the world size"),
    (["model=tiny_deepseek_moe", "parallel.world_size=two"], "parallel.world_size='two' must be a positive"),
    (["model=tiny_deepseek_moe", "parallel.world_size=4", "parallel.zero_stage=5"], "parallel.zero_stage=5"),
    (["model=tiny_deepseek_moe", "--device-memory", "80XB"], "expected a positive size"),
    (["model=tiny_deepseek_moe", "trainer.activation_checkpointing=most"],
     "activation_checkpointing=most (Invalid value 'most', expected one of [none, full, selective])"),
    (["model=tiny_deepseek_moe", "--device-mem", "80GB"], "unknown option"),
    (["model=tiny_deepseek_moe", "parallel.ep_sise=2"], "Could not override 'parallel.ep_sise'"),
])
def test_bad_input_is_a_clear_error(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_smallest_fitting_layout_is_the_smallest():
    cfg = layout_config("tiny_deepseek_moe", micro_batch=2, seq_len=64)

    def best_peak(world):
        return min(plan_memory(c, world)["peak_bytes"] for c in _layouts(cfg, world))

    usable = (best_peak(2) + best_peak(4)) / 2  # fits on 4 ranks, not on 2
    found = smallest_fitting_layout(cfg, int(usable / 0.9), gpus_per_node=2, max_world=8)
    assert found["layout"]["world_size"] == 4 and found["fits"]


def _layouts(cfg, world):
    from dataclasses import replace

    for stage in (1, 2, 3):
        for ep in (1, 2, 4, 8, 16):
            if world % ep == 0:
                yield replace(cfg, parallel=replace(cfg.parallel, ep_size=ep, zero_stage=stage))

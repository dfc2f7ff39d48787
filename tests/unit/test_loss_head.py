"""The chunked loss head (`train/model/loss_head.py`, `model.loss_chunk_tokens`) against the plain one: the same
loss and gradients (hidden states and head weight, tied or not, ignored labels, Grok-1's output multiplier, chunk
sizes that do and do not divide the tokens, fp32 and bf16 autocast, main and MTP heads), and the memory it exists
for: what it saves for backward and the most it holds at once do not grow with tokens × vocabulary."""
import pytest
import torch
import torch.nn.functional as F

from train.config import load_train_config
from train.model import build_model
from train.model.loss_head import IGNORE_INDEX, chunked_cross_entropy
from train.plan import Shapes, activation_bytes
from train.plan.activations import loss_head_transient
from train.plan.measure import peak_new_bytes, saved_tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py

N, D, V = 24, 16, 50


def _inputs(n=N, d=D, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_ND = torch.randn(n, d, generator=g)
    w_VD = torch.randn(v, d, generator=g) / d**0.5
    labels_N = torch.randint(0, v, (n,), generator=g)
    labels_N[::5] = IGNORE_INDEX
    return h_ND, w_VD, labels_N


def _loss_and_grads(h_ND, w_VD, labels_N, chunk, multiplier=1.0, autocast=None):
    """(mean loss, grad h, grad W) of the chunked head (`chunk` tokens) or of the plain one (`chunk=0`)."""
    h, w = h_ND.clone().requires_grad_(), w_VD.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if chunk:
            loss_sum = chunked_cross_entropy(h, w, labels_N, chunk, multiplier)
        else:
            logits = F.linear(h, w)
            if multiplier != 1.0:
                logits = logits * multiplier
            loss_sum = F.cross_entropy(logits.float(), labels_N, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = loss_sum / (labels_N != IGNORE_INDEX).sum()
    loss.backward()
    assert loss.dtype == torch.float32
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("multiplier", [1.0, 0.577])
@pytest.mark.parametrize("chunk", [1, 5, 7, 16, N - 1, N, 100])
def test_chunked_equals_plain_in_fp32(chunk, multiplier):
    """Chunks of 1, 5, 7 (neither divides 24), 16, 23, one chunk and one larger than the batch; every fifth label
    ignored; Grok-1's multiplier: loss and both gradients within 1e-6."""
    h, w, y = _inputs()
    want = _loss_and_grads(h, w, y, 0, multiplier)
    got = _loss_and_grads(h, w, y, chunk, multiplier)
    for g, ref, what in zip(got, want, ("loss", "grad h", "grad W")):
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("multiplier", [1.0, 0.577])
def test_chunked_equals_plain_under_bf16_autocast(multiplier):
    """Under bf16 autocast both run the GEMMs in bf16 and the softmax in fp32; they differ by where bf16 rounds:
    the plain weight gradient is one bf16 GEMM output, the chunked one sums each chunk's in fp32."""
    h, w, y = _inputs(n=64, v=96)
    want = _loss_and_grads(h, w, y, 0, multiplier, torch.bfloat16)
    got = _loss_and_grads(h, w, y, 13, multiplier, torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in got)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, ref in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, ref, atol=2e-4, rtol=1e-2)
    fp32 = _loss_and_grads(h, w, y, 13, multiplier)  # and both near the fp32 values: the rounding is bf16's
    torch.testing.assert_close(got[0], fp32[0], atol=2e-2, rtol=0)


def test_every_label_ignored_gives_zero_and_zero_gradients():
    h, w, y = _inputs()
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = chunked_cross_entropy(h, w, torch.full_like(y, IGNORE_INDEX), 5)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def _model_cfg(name, *extra):
    return load_train_config([f"model={name}", "model.vocab_size=96", "model.d_model=48", "model.num_layers=2",
                              "model.dense_hidden=64", "model.moe.expert_hidden=16", *extra]).model


def _model_step(cfg, ids, labels):
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(ids, labels)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,extra", [
    ("tiny_deepseek_v3", ["model.mtp_depth=2"]),  # two MTP heads through the same lm_head
    ("tiny_deepseek_v3", ["model.mtp_depth=1", "model.tie_embeddings=true"]),
    ("tiny_grok1", []),  # tied head, output multiplier
])
def test_model_chunked_head_equals_plain_head(name, extra):
    """The whole model, main and MTP heads chunked (7 of 2·16 tokens) against `loss_chunk_tokens=0`: every loss
    and every parameter's gradient within 1e-6; no logits with labels when chunked, the same logits without."""
    cfg = _model_cfg(name, *extra)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, dims=1)
    labels[0, :4] = IGNORE_INDEX
    plain, plain_grads = _model_step(_model_cfg(name, *extra, "model.loss_chunk_tokens=0"), ids, labels)
    chunked, grads = _model_step(_model_cfg(name, *extra, "model.loss_chunk_tokens=7"), ids, labels)
    assert chunked.logits is None and plain.logits is not None
    for key in ("loss", "lm_loss", "aux_loss", "mtp_loss"):
        if getattr(plain, key) is not None:
            torch.testing.assert_close(getattr(chunked, key), getattr(plain, key), atol=1e-6, rtol=1e-6)
    assert set(grads) == set(plain_grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, plain_grads[n], atol=1e-6, rtol=1e-6, msg=lambda m: f"{n}: {m}")
    torch.manual_seed(0)
    model = build_model(_model_cfg(name, *extra, "model.loss_chunk_tokens=7"))
    torch.testing.assert_close(model(ids).logits, plain.logits, atol=0, rtol=0)  # no labels: the plain head


def test_one_chunk_is_the_plain_head_bit_for_bit():
    """The default chunk (1,024) covers a tiny run's micro-batch: the plain head runs, so losses and gradients equal
    `loss_chunk_tokens=0` exactly (the golden curves rest on this) and the logits are returned."""
    cfg = _model_cfg("tiny_deepseek_v3", "model.mtp_depth=1")
    assert cfg.loss_chunk_tokens == 1024 and cfg.loss_chunk(2 * 16) is None and cfg.loss_chunk(1025) == 1024
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    out, grads = _model_step(cfg, ids[:, :-1], ids[:, 1:])
    ref, ref_grads = _model_step(_model_cfg("tiny_deepseek_v3", "model.mtp_depth=1", "model.loss_chunk_tokens=0"),
                                 ids[:, :-1], ids[:, 1:])
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits)
    assert all(torch.equal(g, ref_grads[n]) for n, g in grads.items())


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, the head weight (a parameter) excluded."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_saved_bytes_do_not_grow_with_the_vocabulary(autocast):
    """What the chunked head keeps for backward is h (fp32), the labels and one fp32 log-sum-exp per token,
    whatever V: the same bytes at V = 512 and V = 8,192. The plain head keeps at least the fp32 N × V log-softmax."""
    n, d, chunk = 256, 8, 32
    saved = {}
    for v in (512, 8192):
        h, w, y = _inputs(n, d, v)
        h, w = h.requires_grad_(), torch.nn.Parameter(w)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            saved[v] = _saved_bytes(lambda: chunked_cross_entropy(h, w, y, chunk))
            plain = _saved_bytes(lambda: F.cross_entropy(F.linear(h, w).float(), y, reduction="sum"))
        assert plain >= n * v * 4
    assert saved[512] == saved[8192] == n * d * 4 + n * 8 + n * 4


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_working_set_is_one_chunk(autocast):
    """The most a forward + backward holds at once (new storages, measured op by op): the plain head three fp32
    N×V tensors; the chunked one, at N×V = 8M logits, one chunk's logits (c×V fp32, plus their bf16 cast under
    autocast: `loss_head_transient`'s figure) and the gradients' fp32 accumulators (V×D, N×D), nothing of N×V."""
    n, d, v, chunk = 2048, 16, 4096, 128
    h, w, y = _inputs(n, d, v)
    peak = {}
    for c in (0, chunk):
        _, peak[c] = peak_new_bytes(lambda: _loss_and_grads(h, w, y, c, autocast=autocast))
    assert peak[0] > 3 * n * v * 4
    sh = Shapes(batch=1, seq_len=n, bf16=autocast is not None, device_type="cpu")
    cfg = _model_cfg("tiny_mixtral", f"model.vocab_size={v}", f"model.d_model={d}", f"model.loss_chunk_tokens={chunk}")
    grads = (v * d + n * d) * 4
    planned = loss_head_transient(cfg, sh)
    assert planned <= peak[chunk] - grads <= 1.25 * planned
    assert peak[chunk] < n * v * 4 / 8


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planner_counts_the_chunked_head(precision):
    """The planner's `none` activations of a chunked tiny_deepseek_v3 (main + MTP head) within 10% of the measured
    saved storages, and short of the plain head's by at least the two fp32 log-softmaxes (2 × t·V·4) less the two
    log-sum-exps (2 × t·4) kept instead."""
    chunked = _model_cfg("tiny_deepseek_v3", "model.mtp_depth=1", "model.vocab_size=2048", "model.loss_chunk_tokens=16")
    plain = _model_cfg("tiny_deepseek_v3", "model.mtp_depth=1", "model.vocab_size=2048")
    ids = torch.randint(0, 2048, (2, 33), generator=torch.Generator().manual_seed(3))
    bf16 = precision == "bf16"
    torch.manual_seed(0)
    measured = saved_tensor_bytes(build_model(chunked), ids[:, :-1], ids[:, 1:], torch.bfloat16 if bf16 else None)
    sh = Shapes(2, 32, bf16, device_type="cpu")
    planned = activation_bytes(chunked, sh)["by_mode"]["none"]
    assert planned == pytest.approx(measured, rel=0.10)
    assert activation_bytes(plain, sh)["by_mode"]["none"] - planned >= 2 * 64 * 2048 * 4 - 2 * 64 * 4

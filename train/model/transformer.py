"""The full language model: embedding, blocks, final norm, head, optional MTP modules, and the loss.

Shapes: B batch, T tokens, D model dim, V vocabulary.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from train.config.model import ModelConfig
from train.model.attention import KVCache
from train.model.block import Block
from train.model.documents import document_positions
from train.model.loss_head import IGNORE_INDEX, OutputHead
from train.model.moe.experts import GroupedExperts
from train.model.moe.layer import MoELayer, MoELayerOutput
from train.model.mtp import MTPModule, shift_left
from train.model.norms import NORMS, build_norm
from train.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    """`logits` (B, T, V), except when labels were given and the loss head ran in chunks (`model.loss_chunk_tokens`
    below B·T): then None, as the point is never to hold them. The loss fields only when labels were given.
    `aux_terms` and `moe_stats` are filled whenever MoE layers ran (the terms are already coefficient-weighted;
    `aux_loss` is their sum)."""

    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    aux_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    mtp_loss: Optional[torch.Tensor] = None
    moe_stats: list[dict] = field(default_factory=list)


def token_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean CE over labels != -100, in fp32. Zero (not NaN) when every label is ignored, so an MTP depth
    that runs past a short sequence contributes nothing instead of poisoning the loss."""
    loss_sum = F.cross_entropy(
        logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum / (labels_BT != IGNORE_INDEX).sum().clamp(min=1)


def check_causal_routing(model: nn.Module) -> None:
    """Raise if a router of `model` decides a token's experts from other tokens of the batch (expert choice, or
    BASE's balanced assignment in training): KV-cache decoding sees one token at a time and cannot use it."""
    for module in model.modules():
        router = getattr(module, "router", None)
        if router is not None and hasattr(router, "causal") and not router.causal:
            raise ValueError(
                f"model.moe.router={router.moe.router} routes each token by comparing it with the other tokens of "
                "the batch, future positions included (experts choose tokens), so it cannot decode one token at a "
                "time: generation and KV-cache forwards are not supported with it (it is a training-only scheme)")


class MoETransformer(nn.Module):
    """Decoder-only MoE LM: `embed`, `layers` (Blocks), `norm`, `lm_head` (tied to `embed` if
    `cfg.tie_embeddings`), and `mtp` (cfg.mtp_depth MTPModules; an empty list, with no parameters, at 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()  # the schema's rules (a ConfigError naming the field): what the trainer accepts builds
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = OutputHead(cfg.d_model, cfg.vocab_size)
        # Registered last so a seeded init draws the main model's weights identically with or without MTP.
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.mtp_depth + 1))
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the head when configured (again after `to_empty()`, which unties)."""
        if self.cfg.tie_embeddings and self.lm_head is not None and self.embed is not None:
            self.lm_head.weight = self.embed.weight

    def blocks(self) -> list[Block]:
        """Every transformer block: the main ones in order, then each MTP module's block."""
        return [*self.layers, *(m.block for m in self.mtp)]

    def moe_layers(self) -> Iterator[tuple[int, MoELayer]]:
        """(layer index, MoELayer) for every MoE layer, main blocks first, then MTP blocks (num_layers + k - 1)."""
        for block in self.blocks():
            if isinstance(block.ffn, MoELayer):
                yield block.layer_idx, block.ffn

    def new_kv_caches(self) -> list[KVCache]:
        """One empty cache per main-model layer, for `forward(..., kv_caches=...)`."""
        return [KVCache() for _ in self.layers]

    @torch.no_grad()
    def init_weights(self, seed: Union[int, torch.Generator, None] = None) -> None:
        """normal(0, init_std) for every weight matrix (linears, embedding, stacked experts), zeros for biases
        and buffers (the expert selection bias, load counters), ones for norms; RoPE tables recomputed.

        Every matrix gets the same std, as in HF's DeepSeek/Mixtral/DBRX `_init_weights`: no depth-scaled
        output projections, so a fresh model follows the reference recipe.

        `seed` an int: every logical tensor draws from its own generator, seeded from (seed, its name) and, for
        stacked experts, (seed, name, global expert index) (`tensor_seed`). So a rank that holds only some
        experts (`GroupedExperts.placement`, set by `parallel/`) initialises them exactly as one process
        initialises the whole model, whatever the layout and in any order. A generator, or None (the global
        RNG): one stream over the parameters in order (main model first, MTP last), for callers that want that.
        Meta tensors are skipped.
        """
        self.tie_weights()
        std = self.cfg.init_std
        done: set[int] = set()  # ids of parameters already drawn: a tied head is the embedding's tensor
        for prefix, module in self.named_modules():
            if isinstance(module, RotaryEmbedding):
                if not module.inv_freq.is_meta:
                    module.reset_parameters()
                continue
            for name, p in module.named_parameters(recurse=False):
                if id(p) in done or p.is_meta:
                    continue
                done.add(id(p))
                if isinstance(module, NORMS):
                    p.fill_(1.0)
                elif p.dim() < 2:
                    p.zero_()
                elif not isinstance(seed, int):
                    p.normal_(0.0, std, generator=seed)
                elif isinstance(module, GroupedExperts):
                    if name != module.EXPERT_WEIGHTS[0]:
                        continue  # init_expert draws every stacked weight of an expert at once
                    first = module.placement.local_start
                    for i in range(module.num_experts):  # one generator per global expert and weight stream
                        module.init_expert(i, std, lambda stream, i=i: _generator(
                            seed, f"{prefix}.{stream}", p.device, first + i))
                else:
                    p.normal_(0.0, std, generator=_generator(seed, f"{prefix}.{name}", p.device))
            for b in module.buffers(recurse=False):  # the expert bias, and counters such as expert_load_E
                if not b.is_meta:
                    b.zero_()

    def head(self, hn_BTD: torch.Tensor, labels_BT: Optional[torch.Tensor], multiplier: float = 1.0,
             ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(logits, mean CE over labels != -100) of the final-normed hidden states through `lm_head`; the loss only
        with labels. With labels and a chunk (`cfg.loss_chunk`: `loss_chunk_tokens` below B·T): the chunked loss
        head (`loss_head.py`), which returns no logits. Otherwise the plain path: whole logits and
        `token_cross_entropy`, exactly as before chunking existed."""
        chunk = None if labels_BT is None else self.cfg.loss_chunk(labels_BT.numel())
        if chunk is None:
            logits_BTV = self.lm_head(hn_BTD, multiplier=multiplier)
            return logits_BTV, None if labels_BT is None else token_cross_entropy(logits_BTV, labels_BT)
        loss_sum = self.lm_head(hn_BTD, labels_BT, chunk_tokens=chunk, multiplier=multiplier)
        return None, loss_sum / (labels_BT != IGNORE_INDEX).sum().clamp(min=1)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        labels_BT: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        kv_caches: Optional[list[KVCache]] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        """`labels_BT[b, t]` is the target of position t (the caller shifts; -100 = ignore). `positions`
        (T,) default to past..past+T-1 where past is the cached length. With `kv_caches` (one per layer, see
        `new_kv_caches`) the new tokens' keys/values are appended; MTP runs only with labels and no caches.

        `document_ids` (B, T), for packed rows (`data.document_mask`): the index of each token's document in its
        row, non-decreasing along T, the EOD in the document it closes. Positions are then derived per row,
        restarting at 0 at each document, and every attention layer (MTP's too) sees only the same document,
        causally. The MoE balance losses keep their meaning: DeepSeek-V3's sequence-wise term still treats a
        packed row as the sequence. Not with `kv_caches` or explicit `positions`."""
        b, t = input_ids_BT.shape
        if kv_caches is not None:
            check_causal_routing(self)
        if document_ids is not None:
            if kv_caches is not None or positions is not None:
                raise ValueError("document_ids cannot be combined with kv_caches or positions: document masking "
                                 "derives per-row positions itself and is for full-sequence forwards only")
            if document_ids.shape != input_ids_BT.shape:
                raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, expected the input ids' "
                                 f"{tuple(input_ids_BT.shape)}")
            positions = document_positions(document_ids)
        if positions is None:
            past = kv_caches[0].length if kv_caches else 0
            positions = torch.arange(past, past + t, device=input_ids_BT.device)
        emb_BTD = self.embed(input_ids_BT)
        if self.cfg.embedding_multiplier != 1.0:  # Grok-1
            emb_BTD = emb_BTD * self.cfg.embedding_multiplier
        h_BTD = emb_BTD
        moe_outs: list[tuple[int, MoELayerOutput]] = []
        for i, block in enumerate(self.layers):
            h_BTD, moe_out = block(h_BTD, positions, kv_caches[i] if kv_caches is not None else None, input_ids_BT,
                                   document_ids_BT=document_ids)
            if moe_out is not None:
                moe_outs.append((block.layer_idx, moe_out))
        # Grok-1's output multiplier on the main head's logits (MTP heads have none)
        logits_BTV, lm_loss = self.head(self.norm(h_BTD), labels_BT, self.cfg.output_multiplier)

        out = ModelOutput(logits=logits_BTV)
        mtp_losses = []
        if labels_BT is not None and kv_caches is None:
            for module in self.mtp:
                # Depth k sees emb(t_{i+k}) and predicts t_{i+k+1} = labels[i + k].
                k = module.depth
                h_BTD, hn_BTD, moe_out = module(h_BTD, self.embed(shift_left(input_ids_BT, k, 0)), positions,
                                                document_ids)
                if moe_out is not None:
                    moe_outs.append((module.layer_idx, moe_out))
                mtp_losses.append(self.head(hn_BTD, shift_left(labels_BT, k, IGNORE_INDEX))[1])

        aux_terms: dict[str, torch.Tensor] = defaultdict(lambda: h_BTD.new_zeros((), dtype=torch.float32))
        for idx, moe_out in moe_outs:
            for name, term in moe_out.aux_terms.items():
                aux_terms[name] = aux_terms[name] + term
            stats = {k: v.detach() if torch.is_tensor(v) else v for k, v in moe_out.stats.items()}
            out.moe_stats.append({**stats, "layer": idx})
        out.aux_terms = dict(aux_terms)

        if labels_BT is not None:
            out.lm_loss = lm_loss
            out.aux_loss = sum(out.aux_terms.values(), h_BTD.new_zeros((), dtype=torch.float32))
            out.loss = out.lm_loss + out.aux_loss
            if mtp_losses:
                out.mtp_loss = torch.stack(mtp_losses).mean()
                out.loss = out.loss + self.cfg.mtp_loss_weight * out.mtp_loss
        return out


def new_kv_caches(model: MoETransformer) -> list[KVCache]:
    """One empty `KVCache` per main-model layer (same as `model.new_kv_caches()`)."""
    return model.new_kv_caches()


def tensor_seed(seed: int, name: str, index: Optional[int] = None) -> int:
    """The seed of one logical tensor (or of expert `index` of a stacked expert tensor): a hash of the run's
    init seed and the tensor's name in the unsharded model, so it does not depend on which rank draws it."""
    key = f"{seed}/{name}" if index is None else f"{seed}/{name}/{index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _generator(seed: int, name: str, device: torch.device, index: Optional[int] = None) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(tensor_seed(seed, name, index))


def draw_init_seed() -> int:
    """The init seed, drawn from the global RNG: `torch.manual_seed(s)` before it alone fixes the weights."""
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())


def build_model(cfg: ModelConfig) -> MoETransformer:
    """Construct the model on the current default device (use `torch.device("meta")` for full sizes) and
    initialise it from a seed drawn from the global RNG before construction (`draw_init_seed`), so
    `torch.manual_seed` alone fixes the weights, independent of what construction consumes. The trainer builds
    on the meta device instead and lets `parallel.parallelize` allocate and initialise each rank's share with
    the same seed: the tensors equal this function's."""
    seed = draw_init_seed()
    model = MoETransformer(cfg)
    model.init_weights(seed)
    return model

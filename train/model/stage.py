"""A pipeline stage's share of the model, and the forward of one model chunk (pipeline parallelism, issue 20).

Pure model code: which layers a rank keeps and what a chunk of consecutive layers computes. Which rank runs which
chunk, the schedules and the sends between stages are `parallel/pipeline.py`'s.

`keep_share(model, layer_ids, embed, head)` prunes a (meta) `MoETransformer` in place to one rank's share: the
transformer layers it runs (`layers` becomes a `LayerSlice`, whose entries keep their global indices, so every
parameter keeps its logical name, `layers.7.attn...`, and a checkpoint is read and written by name whatever the
layout), the embedding where a chunk needs it, and the final norm, head and MTP modules on the last stage. The
pruned model keeps the whole model's interface (`blocks`, `moe_layers`, `init_weights`, the state dict), so expert
parallelism, converters, checkpointing, materialisation and the optimizer see it as they see a whole model.

`ModelChunk` runs consecutive layers of that share: the first chunk embeds the token ids, the others take the
previous chunk's hidden states; the last applies the final norm, the head and the MTP modules and returns the
micro-batch's loss, lm_loss + mtp_loss_weight x mtp_loss. The balance losses of a chunk's MoE layers never travel:
each is attached to the hidden states by `AuxLoss`, whose backward gives it the gradient 1 that it has in the whole
model's `loss = lm_loss + aux_loss + ...`, so the gradients equal the whole model's. What each chunk saw (its loss
terms and routing statistics) is kept in `ModelChunk.outputs` for the trainer's metrics.

The embedding on the last stage (MTP modules embed the shifted tokens; a tied head is the embedding) is a second
copy of the first stage's: both start equal (the same seed by name), their gradients are summed over the two
stages before the update, and only the first counts in the clipping norm and writes the checkpoint.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch import nn

from train.model.documents import document_positions
from train.model.loss_head import IGNORE_INDEX
from train.model.mtp import shift_left
from train.model.transformer import ModelOutput, MoETransformer


EMBEDDING = "embed.weight"  # the parameter the last stage holds a twin of, when it needs one


class LayerSlice(nn.ModuleDict):
    """Some of the model's transformer layers, keyed by their global index (so parameter names stay logical) and
    iterated in order, like the `nn.ModuleList` of the whole model."""

    def __iter__(self):
        return iter(self.values())


class AuxLoss(torch.autograd.Function):
    """Identity on the hidden states in forward; in backward, the attached balance loss gets gradient 1 (times the
    incoming scale, none here), as if it had been added to the loss that backward starts from."""

    @staticmethod
    def forward(ctx, h_BTD: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return h_BTD.view_as(h_BTD)

    @staticmethod
    def backward(ctx, grad_BTD: torch.Tensor):
        return grad_BTD, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_BTD.device)


def needs_embedding_copy(model_cfg) -> bool:
    """Whether the last stage uses the embedding too (MTP modules, or a head tied to it)."""
    return model_cfg.mtp_depth > 0 or model_cfg.tie_embeddings


def keep_share(model: MoETransformer, layer_ids: Iterable[int], embed: bool, head: bool) -> MoETransformer:
    """Prune `model` in place to the layers `layer_ids` (global indices), the embedding if `embed`, and the final
    norm, head and MTP modules if `head`; returns it."""
    keep = sorted(set(layer_ids))
    model.layers = LayerSlice({str(i): model.layers[i] for i in keep})
    if not embed:
        model.embed = None
    if not head:
        model.norm = None
        model.lm_head = None
        model.mtp = nn.ModuleList()
    return model


class ModelChunk(nn.Module):
    """Layers `layer_ids` of a pruned model (`keep_share`), run as one pipeline chunk; `first` embeds, `last`
    ends with the loss. Holds no parameters of its own: its modules are the share's (same names)."""

    def __init__(self, share: MoETransformer, layer_ids: Iterable[int], first: bool, last: bool):
        super().__init__()
        self.cfg, self.first, self.last = share.cfg, first, last
        self.layers = LayerSlice({str(i): share.layers[str(i)] for i in layer_ids})
        if first or (last and needs_embedding_copy(share.cfg)):
            self.embed = share.embed
        if last:
            self.norm, self.lm_head, self.mtp = share.norm, share.lm_head, share.mtp
            self._head = share.head  # the whole model's head (chunked loss head included)
        self.outputs: list[ModelOutput] = []  # one per forward: loss terms and routing statistics, detached

    def forward(self, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`x`: the token ids (B, T) on the first chunk, the previous chunk's hidden states (B, T, D) after it.
        `input_ids`, `labels`, `document_ids`: the micro-batch's, given to every chunk (routers that route on token
        ids, MTP and the loss need them). Returns the hidden states, or on the last chunk the loss (labels
        required there)."""
        ids = x if self.first else input_ids
        b, t = ids.shape
        positions = (document_positions(document_ids) if document_ids is not None
                     else torch.arange(t, device=ids.device))
        if self.first:
            h_BTD = self.embed(x)
            if self.cfg.embedding_multiplier != 1.0:
                h_BTD = h_BTD * self.cfg.embedding_multiplier
        else:
            h_BTD = x
        out = ModelOutput(logits=None)
        terms: dict[str, torch.Tensor] = defaultdict(lambda: h_BTD.new_zeros((), dtype=torch.float32))
        for block in self.layers:
            h_BTD, moe_out = block(h_BTD, positions, None, ids, document_ids_BT=document_ids)
            h_BTD = self._collect(h_BTD, block.layer_idx, moe_out, out, terms)
        loss = None
        if self.last:
            _, out.lm_loss = self._head(self.norm(h_BTD), labels, self.cfg.output_multiplier)
            loss = out.lm_loss
            mtp_losses = []
            for module in self.mtp:
                k = module.depth
                h_BTD, hn_BTD, moe_out = module(h_BTD, self.embed(shift_left(ids, k, 0)), positions, document_ids)
                hn_BTD = self._collect(hn_BTD, module.layer_idx, moe_out, out, terms)
                mtp_losses.append(self._head(hn_BTD, shift_left(labels, k, IGNORE_INDEX))[1])
            if mtp_losses:
                out.mtp_loss = torch.stack(mtp_losses).mean()
                loss = loss + self.cfg.mtp_loss_weight * out.mtp_loss
        out.aux_terms = {k: v.detach() for k, v in terms.items()}
        out.aux_loss = sum(out.aux_terms.values(), torch.zeros((), dtype=torch.float32, device=h_BTD.device))
        # this chunk's share of the micro-batch's loss: summed over the chunks it is the whole model's `loss`
        out.loss = out.aux_loss if loss is None else loss.detach() + out.aux_loss
        if out.lm_loss is not None:
            out.lm_loss = out.lm_loss.detach()
        if out.mtp_loss is not None:
            out.mtp_loss = out.mtp_loss.detach()
        self.outputs.append(out)
        return h_BTD if loss is None else loss

    @staticmethod
    def _collect(h_BTD, layer_idx, moe_out, out: ModelOutput, terms: dict) -> torch.Tensor:
        """Record a block's routing statistics and loss terms; attach its balance loss to `h_BTD` (`AuxLoss`)."""
        if moe_out is None:
            return h_BTD
        stats = {k: v.detach() if torch.is_tensor(v) else v for k, v in moe_out.stats.items()}
        out.moe_stats.append({**stats, "layer": layer_idx})
        if not moe_out.aux_terms:
            return h_BTD
        for name, term in moe_out.aux_terms.items():
            terms[name] = terms[name] + term.detach()
        if torch.is_grad_enabled():
            h_BTD = AuxLoss.apply(h_BTD, sum(moe_out.aux_terms.values()))
        return h_BTD


def merge_outputs(outputs: list[ModelOutput]) -> ModelOutput:
    """One micro-batch's outputs of this rank's chunks as one partial `ModelOutput`: loss terms summed, statistics
    concatenated, lm/mtp loss from the last chunk where this rank runs it."""
    merged = ModelOutput(logits=None, moe_stats=[])
    aux: dict[str, torch.Tensor] = {}
    for o in outputs:
        merged.loss = o.loss if merged.loss is None else merged.loss + o.loss
        merged.aux_loss = o.aux_loss if merged.aux_loss is None else merged.aux_loss + o.aux_loss
        for k, v in o.aux_terms.items():
            aux[k] = aux[k] + v if k in aux else v
        merged.moe_stats.extend(o.moe_stats)
        merged.lm_loss = o.lm_loss if o.lm_loss is not None else merged.lm_loss
        merged.mtp_loss = o.mtp_loss if o.mtp_loss is not None else merged.mtp_loss
    merged.aux_terms = aux
    return merged

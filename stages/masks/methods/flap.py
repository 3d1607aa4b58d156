"""FLAP (An et al., AAAI 2024): structured pruning by the fluctuation of input channels.

The score of input channel j of an output projection W (``o_proj`` for attention,
``down_proj`` for the MLP) is its weighted input feature variance

    S_j = Var_n(X_nj) · ‖W[:, j]‖²

— how far the layer's output would move if channel j were replaced by its mean over the
calibration set. Pruning units are whole structures: an attention *KV group* (its query
heads, its key and value head, and their ``o_proj`` columns — with grouped-query attention a
key/value head and the query heads that read it go together) and an MLP channel (a row of
``gate``/``up``, a column of ``down``).

Structure search ("AL-AM", FLAP's default): channel scores are standardised per module kind
within each layer, a unit's score is the mean of its channels' standardised scores, and all
units are ranked together and the best units are kept until the kept parameters reach
(1 - ratio) of the blocks' total, so every layer ends with its own width. "UL-UM" keeps the
same share of units in every layer instead.

Bias compensation: a removed channel is replaced by its calibration mean, i.e. its
contribution W[:, removed] · mean[removed] becomes a bias of the output projection.

Every function here is pure maths on tensors; which layers and which statistics is
orchestration, in ``stages.masks.structured``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.masks.core import MaskMethod, param, register

STRUCTURES = ("AL-AM", "UL-UM")


@register
@dataclass(frozen=True)
class FLAP(MaskMethod):
    name = "flap"
    kind = "structured"  # the whole model at once: stages.masks.structured.build
    structure: str = param("AL-AM", "AL-AM (global ranking, per-layer widths) or UL-UM (the "
                           "same share in every layer)")
    bias: bool = param(True, "bias compensation for the removed channels")

    def problems(self) -> list[str]:
        if self.structure not in STRUCTURES:
            return [f"--flap-structure {self.structure!r}: choose {' or '.join(STRUCTURES)}"]
        return []


@dataclass(frozen=True)
class Layout:
    """The shapes that define a block's structures (from the model's config)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def group_cost(self) -> int:
        """Weights one KV group holds: q and o for each of its heads, plus one k and one v."""
        return (2 * self.heads_per_group + 2) * self.head_dim * self.hidden

    @property
    def channel_cost(self) -> int:
        """Weights one MLP channel holds: a row of gate and up, a column of down."""
        return 3 * self.hidden

    def block_cost(self) -> int:
        return self.kv_heads * self.group_cost + self.intermediate * self.channel_cost


def fluctuation(weight: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per input channel: input variance times the squared norm of the weight column."""
    return var.float() * weight.float().pow(2).sum(0)


def unit_scores(channel_scores: torch.Tensor, width: int) -> torch.Tensor:
    """Mean channel score of each unit of ``width`` consecutive channels."""
    return channel_scores.reshape(-1, width).mean(-1)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit deviation within each layer (each row), so attention and MLP units
    compare; the ranking across layers then decides each layer's width."""
    mean, std = scores.mean(-1, keepdim=True), scores.std(-1, keepdim=True)
    return (scores - mean) / std.clamp_min(1e-12)


def search(attn_channels: torch.Tensor, mlp: torch.Tensor, layout: Layout, ratio: float,
           structure: str = "AL-AM") -> tuple[torch.Tensor, torch.Tensor]:
    """Which KV groups ([layers, groups]) and MLP channels ([layers, channels]) to keep,
    from the channel scores of o_proj ([layers, heads·head_dim]) and down_proj."""
    width = layout.heads_per_group * layout.head_dim
    if structure == "UL-UM":
        attn = torch.stack([unit_scores(layer, width) for layer in attn_channels])
        return _top_per_layer(attn, 1 - ratio), _top_per_layer(mlp, 1 - ratio)
    # Standardise channels first, then average: a group's score stays on the channels' scale
    # (averaging first and standardising the averages would stretch the groups' spread).
    attn = torch.stack([unit_scores(layer, width) for layer in standardize(attn_channels)])
    scores = torch.cat([attn.flatten(), standardize(mlp).flatten()])
    costs = torch.cat([torch.full((attn.numel(),), float(layout.group_cost)),
                       torch.full((mlp.numel(),), float(layout.channel_cost))])
    order = scores.argsort(descending=True)
    kept_cost = costs[order].cumsum(0)
    budget = (1 - ratio) * costs.sum()
    n_keep = int((kept_cost - budget).abs().argmin()) + 1  # the prefix closest to the budget
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep[:attn.numel()].reshape(attn.shape), keep[attn.numel():].reshape(mlp.shape)


def _top_per_layer(scores: torch.Tensor, share: float) -> torch.Tensor:
    k = max(1, round(scores.shape[1] * share))
    top = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


def block_masks(groups: torch.Tensor, channels: torch.Tensor,
                layout: Layout) -> dict[str, torch.Tensor]:
    """Keep-masks of a block's seven projections from its kept groups and channels.

    Output rows of q/k/v and gate/up, input columns of o and down: a removed unit is
    removed from every matrix it touches, so the block is exactly a narrower block.
    """
    q_rows = groups.repeat_interleave(layout.heads_per_group * layout.head_dim)
    kv_rows = groups.repeat_interleave(layout.head_dim)
    everything = torch.ones(layout.hidden, dtype=torch.bool)
    return {
        "self_attn.q_proj": torch.outer(q_rows, everything),
        "self_attn.k_proj": torch.outer(kv_rows, everything),
        "self_attn.v_proj": torch.outer(kv_rows, everything),
        "self_attn.o_proj": torch.outer(everything, q_rows),
        "mlp.gate_proj": torch.outer(channels, everything),
        "mlp.up_proj": torch.outer(channels, everything),
        "mlp.down_proj": torch.outer(everything, channels),
    }


def compensation(weight: torch.Tensor, mean: torch.Tensor,
                 kept_inputs: torch.Tensor) -> torch.Tensor:
    """The bias that replaces the removed input channels by their calibration mean."""
    removed = ~kept_inputs
    return weight.float()[:, removed] @ mean.float()[removed]

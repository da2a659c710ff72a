"""SofareM3: the multi-modal direction-and-return model (PyTorch Lightning).

Three encoders read the same lookback window of the features table, one per modality:
micro (candles + TA-Lib features) through a Transformer encoder, macro (FRED) through a causal
dilated TCN, safe haven (daily markets) through a smaller Transformer encoder. An attention fusion
layer (a learned query attending over the three modality embeddings) feeds two heads: up/down
logits and the standardised next-horizon log return. Loss = w·CE + (1−w)·Huber.

Imported only by training and serving code (torch is heavy); DAG files never import it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

ARCHITECTURE = "SofareM3/1"  # bump on any change of the network's structure (semver MAJOR)


@dataclass(frozen=True)
class Hyper:
    """One point of the search space (what Optuna tunes). The defaults are sized for ~15k noisy hourly
    samples on 2 CPU cores (one epoch over 2.5 years in ~10 s, docs/benchmarks.md): 128 wide, 48 bars back
    and batches of 64 (the former defaults) cost ~4.6x the time per sample and reached the same validation
    loss (0.542 in its first epochs)."""

    hidden_size: int = 64
    num_layers: int = 1
    num_heads: int = 4
    dropout: float = 0.1
    learning_rate: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 1e-4
    lookback: int = 24

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def head_multiple(size: int, heads: int) -> int:
    """The smallest width >= size that `heads` attention heads divide (e.g. 64 with 6 heads -> 66)."""
    return heads * math.ceil(size / heads)


class TransformerEncoder(nn.Module):
    """Linear projection + learned positions + pre-norm Transformer layers; the last step's state."""

    def __init__(self, n_in: int, width: int, layers: int, heads: int, dropout: float, max_len: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_in, width)
        self.pos = nn.Parameter(torch.randn(1, max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.pos[:, -x.shape[1] :]
        return self.norm(self.encoder(h)[:, -1])


class CausalBlock(nn.Module):
    def __init__(self, width: int, dilation: int, dropout: float, kernel: int = 3) -> None:
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv1 = nn.Conv1d(width, width, kernel, dilation=dilation)
        self.conv2 = nn.Conv1d(width, width, kernel, dilation=dilation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, T]
        h = self.drop(F.gelu(self.conv1(F.pad(x, (self.pad, 0)))))
        h = self.drop(F.gelu(self.conv2(F.pad(h, (self.pad, 0)))))
        return x + h


class TCNEncoder(nn.Module):
    """Causal dilated convolutions (dilation 1, 2, 4, …): step t sees only steps <= t."""

    def __init__(self, n_in: int, width: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Conv1d(n_in, width, 1)
        self.blocks = nn.Sequential(*[CausalBlock(width, 2**i, dropout) for i in range(layers)])
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, F]
        h = self.blocks(self.proj(x.transpose(1, 2)))
        return self.norm(h[:, :, -1])


class AttentionFusion(nn.Module):
    """A learned query attends over the modality embeddings; the weights say which modality mattered."""

    def __init__(self, widths: list[int], width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.align = nn.ModuleList([nn.Linear(w, width) for w in widths])
        self.modality = nn.Parameter(torch.randn(1, len(widths), width) * 0.02)
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout))

    def forward(self, embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.stack([a(e) for a, e in zip(self.align, embeddings)], dim=1) + self.modality
        fused, weights = self.attn(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens)
        return self.out(fused[:, 0] + tokens.mean(dim=1)), weights[:, 0]


class SofareM3(L.LightningModule):
    def __init__(
        self,
        n_micro: int,
        n_safe: int,
        n_macro: int,
        hyper: dict[str, Any],
        loss_weight: float = 0.5,
        huber_delta: float = 1.0,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        h = Hyper(**hyper)
        width = head_multiple(h.hidden_size, h.num_heads)
        half_heads = max(1, h.num_heads // 2)
        half = head_multiple(max(h.hidden_size // 2, half_heads), half_heads)
        self.micro = TransformerEncoder(n_micro, width, h.num_layers, h.num_heads, h.dropout, h.lookback)
        self.safe = TransformerEncoder(max(n_safe, 1), half, h.num_layers, half_heads, h.dropout, h.lookback)
        self.macro = TCNEncoder(max(n_macro, 1), max(h.hidden_size // 2, 1), h.num_layers, h.dropout)
        self.fusion = AttentionFusion([width, half, max(h.hidden_size // 2, 1)], width, h.num_heads, h.dropout)
        self.cls_head = nn.Linear(width, 2)
        self.reg_head = nn.Linear(width, 1)
        self.hyper = h

    def forward(
        self, micro: torch.Tensor, safe: torch.Tensor, macro: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused, _ = self.fusion([self.micro(micro), self.safe(safe), self.macro(macro)])
        return self.cls_head(fused), self.reg_head(fused).squeeze(-1)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        micro, safe, macro, y_up, y_ret = batch
        logits, ret = self(micro, safe, macro)
        ce = F.cross_entropy(logits, y_up)
        huber = F.huber_loss(ret, y_ret, delta=self.hparams["huber_delta"])
        w = self.hparams["loss_weight"]
        return w * ce + (1 - w) * huber, ce, (logits.argmax(-1) == y_up).float().mean()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self.loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], _: int) -> None:
        loss, ce, acc = self.loss(batch)
        n = len(batch[0])
        self.log("val_loss", loss, on_epoch=True, prog_bar=False, batch_size=n)
        self.log("val_ce", ce, on_epoch=True, batch_size=n)
        self.log("val_acc", acc, on_epoch=True, batch_size=n)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hyper.learning_rate, weight_decay=self.hyper.weight_decay
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * self.hparams["warmup_fraction"])

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""The model's sizes as the formulas name them (l, h, a, s, V) and its parameter count per stage."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config.schema import ModelConfig


@dataclass(frozen=True)
class ModelShape:
    n_layer: int  # l
    hidden: int  # h
    heads: int  # a
    seq_len: int  # s
    vocab: int  # V as configured (before padding)
    vocab_multiple: int = 1  # the embedding is padded to a multiple of this times tp
    name: str = ""

    @classmethod
    def from_config(cls, m: ModelConfig) -> ModelShape:
        return cls(m.n_layer, m.n_embd, m.n_head, m.seq_len, m.vocab_size, m.make_vocab_size_divisible_by, m.name)

    def padded_vocab(self, tp: int) -> int:
        """Megatron-LM's rule, as the trainer applies it (trainer.parallel.layers.padded_vocab_size,
        not imported: that module pulls in torch and DeepSpeed, 5 s for one line of arithmetic)."""
        multiple = tp * self.vocab_multiple
        return -(-self.vocab // multiple) * multiple

    @property
    def layer_params(self) -> int:
        """One block: QKV + projection (4h²) and the MLP (8h²) plus their biases and 2 LayerNorms (13h)."""
        return 12 * self.hidden**2 + 13 * self.hidden

    def params(self, tp: int = 1) -> int:
        """The whole model, tied embedding counted once (Narayanan et al. 2021, eq. 2, plus the final LayerNorm)."""
        h = self.hidden
        return self.n_layer * self.layer_params + (self.padded_vocab(tp) + self.seq_len) * h + 2 * h

    def stage_params(self, tp: int, pp: int, first: bool, last: bool) -> float:
        """Parameters one rank of a stage holds: its blocks and embedding rows split over tp; the
        position embedding replicated on the first stage; the last stage keeps its own copy of the
        tied word embedding for the head (as Megatron-LM and the trainer's TiedLayerSpec do)."""
        h = self.hidden
        split = self.n_layer // pp * self.layer_params
        if first or last:
            split += self.padded_vocab(tp) * h
        replicated = (self.seq_len * h if first else 0) + (2 * h if last else 0)
        return split / tp + replicated

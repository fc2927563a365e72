"""A few greedy continuations of fixed prompts after every validation pass (``train.sample_prompts``).

Rank 0 decodes with its own replica of the model (``trainer.inference.decode.generate``, key/value cache,
temperature 0), so only layouts where rank 0 holds the whole model sample: tp=1, pp=1 and ZeRO below 3
(data parallelism and ZeRO-1/2 keep a full replica on every rank). Tensor or pipeline parallelism and
ZeRO-3 split the weights over ranks; gathering them on rank 0 would cost the memory those layouts exist
to save, so there the run says once at the start that it does not sample, and a saved checkpoint can be
sampled with ``python -m trainer.generate``. The other ranks do not wait: they meet rank 0 again at
the next step's collectives. Greedy decoding draws no random numbers, so sampling leaves the run's
random state, and with it a resumed run, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config.schema import Config, ConfigError


def skip_reason(cfg: Config) -> str | None:
    """Why this layout cannot sample on rank 0 (None: it can)."""
    p = cfg.parallel
    if p.tp == 1 and p.pp == 1 and p.zero_stage < 3:
        return None
    return (
        f"train.sample_prompts: no samples at this layout (tp {p.tp}, pp {p.pp}, ZeRO {p.zero_stage}): no rank "
        "holds the whole model; sample a saved checkpoint with python -m trainer.generate"
    )


class Samples:
    """The prompts, tokenized once with the run's tokenizer; ``generate`` continues them."""

    def __init__(self, prompts: list[str], new_tokens: int, tokenizer_dir: Path, seq_len: int):
        from trainer.data.tokenizer import eot_id, load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.eos_id = eot_id(self.tokenizer)
        self.prompts, self.new_tokens = list(prompts), new_tokens
        self.ids = [self.tokenizer.encode(p, add_special_tokens=False).ids for p in self.prompts]
        for prompt, ids in zip(self.prompts, self.ids):
            if len(ids) + new_tokens > seq_len:
                raise ConfigError(
                    "train.sample_prompts",
                    prompt,
                    f"{len(ids)} tokens + train.sample_tokens={new_tokens} exceed model.seq_len={seq_len}; "
                    "shorten it or lower train.sample_tokens",
                )

    @torch.no_grad()
    def generate(self, model) -> list[dict[str, str]]:
        """Each prompt's greedy continuation by ``model`` (a dense GPT; left in the mode it was in)."""
        from trainer.inference.decode import Sampling, generate

        sampling = Sampling(max_new_tokens=self.new_tokens, temperature=0.0)
        was_training = model.training
        model.eval()
        try:
            rows = []
            for prompt, ids in zip(self.prompts, self.ids):
                new = generate(model, ids, sampling, eos_id=self.eos_id)
                rows.append({"prompt": prompt, "completion": self.tokenizer.decode(new)})
            return rows
        finally:
            model.train(was_training)

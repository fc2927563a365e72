"""Blended data: several sources mixed by weight (``data.blend``), Megatron-LM's and GPT-NeoX's convention.

Every source is prepared and cached on its own (its own train/validation split) with one shared tokenizer:
``data.tokenizer.source=train`` fits one byte-level BPE on the training documents of all sources together,
a path is used as is. Sample order of a blended epoch (``BlendedStream``):

- An epoch has T = the sum of the sources' sample counts. Source i gets ``C_i = round(w_i * T)`` of its
  positions (largest remainders, so the counts add up to T): its share of every epoch is its weight to 1/T.
- The positions are interleaved by due time: source i's c-th sample is due at ``(c + 0.5) / w_i`` and the
  epoch takes them in that order (ties by source index). Every prefix, and so every global batch, holds each
  source within one sample of its weight (Megatron's blending index is the same idea, greedy by error).
- Source i's samples are visited in shuffled cycles: its g-th sample over the whole run (counting across
  epochs) is ``default_rng([seed, i, g // n_i]).permutation(n_i)[g % n_i]``; a source smaller than its
  share repeats, a larger one continues where the previous epoch stopped.

The epoch's positions are then read exactly as ``SampleStream`` reads its permutation (global batches,
contiguous dp shares, micro-batches), so the global sample sequence does not depend on the data-parallel
layout, and the stream resumes at any micro-batch from ``state_dict()``.

Validation mixes the sources' validation splits the same way (``blended_eval_batches``): the mean loss
over it is the weighted mean of the per-source losses (to one sample in the pass).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.config.schema import BlendSource, ConfigError, DataConfig
from trainer.data.stream import Batch, SampleStream, TokenFile

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"
# DataConfig fields a blend entry may set (the rest: cache_dir, val_fraction, num_proc, tokenizer, come
# from data.* and are shared by all sources).
SOURCE_FIELDS = (
    "name",
    "source",
    "paths",
    "hub_name",
    "hub_config",
    "hub_split",
    "text_field",
    "max_documents",
    "megatron",
)


# ---------------------------------------------------------------------------------------------
# Config


def blend_sources(data: DataConfig) -> list[tuple[float, DataConfig]]:
    """(normalised weight, the source's own DataConfig) for each entry of ``data.blend``; bad blends refused."""
    entries = list(data.blend)
    if not entries:
        raise ConfigError("data.blend", [], "is empty; list sources as [{weight: 0.5, data: pystdlib}, ...]")
    weights = []
    sources = []
    defaults = BlendSource()
    for i, entry in enumerate(entries):
        if not isinstance(entry, BlendSource):  # a plain dict, when built by hand
            entry = BlendSource(**entry)
        if not entry.weight > 0 or not np.isfinite(entry.weight):
            raise ConfigError(f"data.blend[{i}].weight", entry.weight, "every source needs a weight > 0")
        fields: dict = {}
        if entry.data:
            fields = _option_fields(i, entry.data)
        elif not (entry.paths or entry.hub_name or entry.source in ("pystdlib", "megatron")):
            raise ConfigError(
                f"data.blend[{i}]",
                _describe(entry),
                "names no source; give data: <a conf/data option> or inline paths / hub_name / source: pystdlib "
                "/ source: megatron with megatron: {train_prefix: ...}",
            )
        for key in SOURCE_FIELDS:  # inline settings (those that differ from the defaults) win
            value = getattr(entry, key)
            if not entry.data or value != getattr(defaults, key):
                fields[key] = list(value) if isinstance(value, list) else value
        fields["name"] = fields.get("name") or f"source{i}"
        weights.append(float(entry.weight))
        sources.append(dataclasses.replace(data, blend=[], **fields))
        if sources[-1].source == "megatron":
            from trainer.config.validate import validate_megatron

            validate_megatron(sources[-1], f"data.blend[{i}]")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError("data.blend", names, "two sources share a name; give each entry its own name")
    total = sum(weights)
    return [(w / total, s) for w, s in zip(weights, sources)]


def _option_fields(i: int, option: str) -> dict:
    """The source settings of conf/data/<option>.yaml (its tokenizer is ignored: a blend shares data.tokenizer)."""
    from omegaconf import OmegaConf

    from trainer.config.rundir import register_resolvers

    path = CONF_DATA / f"{option}.yaml"
    choices = sorted(p.stem for p in CONF_DATA.glob("*.yaml") if p.stem != "blend")
    if option == "blend" or not path.is_file():
        raise ConfigError(f"data.blend[{i}].data", option, f"no such data source; choose one of: {', '.join(choices)}")
    register_resolvers()
    node = OmegaConf.load(path)
    node.pop("tokenizer", None)
    fields = OmegaConf.to_container(node, resolve=True)
    unknown = sorted(set(fields) - set(SOURCE_FIELDS))
    if unknown:
        raise ConfigError(f"data.blend[{i}].data", option, f"sets {unknown}, which a blend entry cannot set")
    return fields


def _describe(entry: BlendSource) -> dict:
    return {"weight": entry.weight, "source": entry.source, "paths": list(entry.paths)}


# ---------------------------------------------------------------------------------------------
# Prepare


@dataclass(frozen=True)
class BlendedData:
    """The prepared sources of a blend (in ``data.blend`` order) and what they share."""

    names: tuple[str, ...]
    weights: tuple[float, ...]  # normalised
    sources: tuple  # PreparedData each
    directory: Path  # the cache directory the sources live in
    tokenizer_dir: Path
    vocab_size: int
    eot_id: int
    dtype: str
    train_tokens: int
    val_tokens: int


def prepare_blend(data: DataConfig, prepare, log=print) -> BlendedData:
    """Prepare every source of ``data.blend`` with one tokenizer (``prepare`` = ``trainer.data.prepare.prepare``);
    Megatron sources are read in place (``trainer.data.indexed.prepare_megatron``)."""
    from trainer.data.indexed import prepare_megatron

    sources = blend_sources(data)
    tok_source = data.tokenizer.source
    if tok_source == "train":
        tok_source = str(_blend_tokenizer(sources, data, log))
    prepared = []
    for weight, source in sources:
        source = dataclasses.replace(source, tokenizer=dataclasses.replace(data.tokenizer, source=tok_source))
        prepared.append((prepare_megatron if source.source == "megatron" else prepare)(source, log))
        log(f"data: blend source {source.name}: weight {weight:.4f}")
    first = prepared[0]
    return BlendedData(
        names=tuple(s.name for _, s in sources),
        weights=tuple(w for w, _ in sources),
        sources=tuple(prepared),
        directory=Path(data.cache_dir),
        tokenizer_dir=first.tokenizer_dir,
        vocab_size=first.vocab_size,
        eot_id=first.eot_id,
        dtype=first.dtype,
        train_tokens=sum(p.train_tokens for p in prepared),
        val_tokens=sum(p.val_tokens for p in prepared),
    )


def _blend_tokenizer(sources: list[tuple[float, DataConfig]], data: DataConfig, log) -> Path:
    """One byte-level BPE fitted on the training documents of all sources, cached by what it depends on.

    With ``data.tokenizer.train_bytes`` > 0, source i gives ``w_i * train_bytes`` of them (spread over it), so
    the BPE sees the mix the model trains on; a source smaller than its part gives all it has.
    """
    from trainer.data import prepare as prep
    from trainer.data.tokenizer import save_tokenizer

    budget = data.tokenizer.train_bytes
    parts = [(source, max(1, round(weight * budget)) if budget else 0) for weight, source in sources]
    key = {
        "sources": [prep.cache_key(s) for _, s in sources],
        "vocab_size": data.tokenizer.vocab_size,
        "eot": data.tokenizer.eot,
        "train_bytes": [b if prep.bpe_sample_fraction(s, b) != 1.0 else 0 for s, b in parts],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(data.cache_dir) / f"blend-tokenizer-{digest}"
    if (directory / "tokenizer.json").is_file():
        log(f"data: using cached blend tokenizer {directory}")
        return directory
    tok = prep.fit_tokenizer(parts, data.tokenizer, log, progress=False)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_tokenizer(tok, tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, directory)
        except OSError:  # published meanwhile by another process
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


# ---------------------------------------------------------------------------------------------
# Sample order


def quotas(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts proportional to ``weights`` that add up to ``total`` (largest remainders)."""
    exact = np.asarray(weights, dtype=np.float64) / np.sum(weights) * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def interleave(counts: Sequence[int], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(source, ordinal) of each position: source i's c-th sample is due at (c + 0.5) / w_i, taken in order."""
    due = [(np.arange(c) + 0.5) / w for c, w in zip(counts, weights)]
    source = np.concatenate([np.full(c, i, dtype=np.int64) for i, c in enumerate(counts)])
    ordinal = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    order = np.lexsort((source, np.concatenate(due)))  # by due time, then by source index
    return source[order], ordinal[order]


class _Count:
    """What ``SampleStream`` asks of its token file: the number of samples (here, of one blended epoch)."""

    def __init__(self, num_samples: int):
        self.count = num_samples

    def num_samples(self, seq_len: int) -> int:
        return self.count


class BlendedStream(SampleStream):
    """``SampleStream`` over a blend of token files: the same steps, shares and resumption (module doc)."""

    def __init__(
        self,
        sources: Sequence[TokenFile],
        weights: Sequence[float],
        seq_len: int,
        micro_batch: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        start_step: int = 0,
    ):
        if not sources or len(sources) != len(weights) or min(weights) <= 0:
            raise ValueError(f"BlendedStream: need one weight > 0 per source; got {list(weights)}")
        self.sources = list(sources)
        self.weights = [float(w) / float(sum(weights)) for w in weights]
        self.source_samples = [t.num_samples(seq_len) for t in self.sources]
        for tokens, n in zip(self.sources, self.source_samples):
            if n == 0:
                raise ValueError(
                    f"data: blend source {tokens.path} has no sample of seq_len+1={seq_len + 1} tokens; "
                    "use a larger corpus or a smaller model.seq_len"
                )
        self.counts = quotas(self.weights, sum(self.source_samples))
        self.blend_source, self.blend_ordinal = interleave(self.counts, self.weights)
        self._cycles: dict[tuple[int, int], np.ndarray] = {}
        super().__init__(
            _Count(sum(self.source_samples)), seq_len, micro_batch, grad_accum, dp_rank, dp_size, seed, start_step
        )

    def next_micro_batch(self) -> Batch:
        rows = self.next_indices()  # (micro_batch, 2): source, sample
        batch = make_rows(self.sources, rows, self.seq_len)
        self.micro += 1
        if self.micro == self.grad_accum:
            self.seek(self.step + 1)
        return batch

    def _permutation(self) -> np.ndarray:
        """(T, 2) int64: the source and the source's sample index of each position of this epoch."""
        if self._perm_epoch != self.epoch:
            samples = np.empty(len(self.blend_source), dtype=np.int64)
            for i, n in enumerate(self.source_samples):
                mine = self.blend_source == i
                drawn = self.epoch * int(self.counts[i]) + self.blend_ordinal[mine]  # over the whole run
                cycles, within = np.divmod(drawn, n)
                out = np.empty(len(drawn), dtype=np.int64)
                for cycle in np.unique(cycles):
                    at = cycles == cycle
                    out[at] = self._cycle(i, int(cycle))[within[at]]
                samples[mine] = out
            self._perm, self._perm_epoch = np.stack([self.blend_source, samples], axis=1), self.epoch
            self._cycles.clear()
        return self._perm

    def _cycle(self, source: int, cycle: int) -> np.ndarray:
        if (source, cycle) not in self._cycles:
            rng = np.random.default_rng([self.seed, source, cycle])
            self._cycles[source, cycle] = rng.permutation(self.source_samples[source])
        return self._cycles[source, cycle]

    def state_dict(self) -> dict:
        return super().state_dict() | {"blend": self._blend_fields()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("blend") != self._blend_fields():
            raise ValueError(
                f"data: cannot resume the sample stream: it was saved with blend={state.get('blend')} "
                f"([weight, samples] per source) but this run has {self._blend_fields()}; "
                "resume with the same data.blend"
            )
        super().load_state_dict(state)

    def _blend_fields(self) -> list[list[float]]:
        return [[w, n] for w, n in zip(self.weights, self.source_samples)]


def make_rows(sources: Sequence[TokenFile], rows: np.ndarray, seq_len: int) -> Batch:
    """(x, y) from (source, sample) rows, as ``make_batch`` does for one file."""
    samples = torch.from_numpy(np.stack([sources[int(s)].sample(int(i), seq_len) for s, i in rows]))
    return samples[:, :-1].contiguous(), samples[:, 1:].contiguous()


def blended_eval_batches(
    sources: Sequence[TokenFile],
    weights: Sequence[float],
    seq_len: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    num_batches: int,
) -> Iterator[Batch]:
    """``eval_batches`` over the sources' validation splits, interleaved by weight: source i's c-th sample is
    its file's sample c (wrapping around a short split). The set depends on the global batch alone."""
    weights = [float(w) / float(sum(weights)) for w in weights]
    total = num_batches * global_batch
    source, ordinal = interleave(quotas(weights, total), weights)
    for i, tokens in enumerate(sources):
        available = tokens.num_samples(seq_len)
        per_batch = np.bincount(np.arange(total)[source == i] // global_batch, minlength=num_batches).max(initial=0)
        if available < per_batch:  # a validation batch would repeat this source's samples
            raise ValueError(
                f"data: the validation split of blend source {tokens.path} has {available} samples of "
                f"seq_len+1={seq_len + 1} tokens, fewer than its {per_batch} of a global batch; raise "
                "data.val_fraction, use a larger corpus or a smaller parallel.global_batch / model.seq_len"
            )
        ordinal[source == i] %= max(available, 1)
    rows = np.stack([source, ordinal], axis=1).reshape(num_batches, dp_size, -1, 2)[:, dp_rank]
    micro = rows.reshape(-1, micro_batch, 2)
    return (make_rows(sources, r, seq_len) for r in micro)

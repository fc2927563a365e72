"""Loss, perplexity and token count of a trained model on held-out text, on one process
(``python -m trainer.evaluate``; README "Using a trained model").

    python -m trainer.evaluate ckpt=runs/<id>                        # the run's own validation set
    python -m trainer.evaluate ckpt=runs/<id> eval_batches=all       # all of its held-out split
    python -m trainer.evaluate ckpt=runs/<id> data=files 'data.paths=[notes.txt]' out=eval.json
    python -m trainer.evaluate ckpt=hf/gpt2 data=files 'data.paths=[notes.txt]'    # a Hugging Face directory

By default the data are the run's own, as its checkpoint recorded them (``config.yaml``): the held-out split,
the run's ``model.seq_len``, ``parallel.global_batch``, ``parallel.micro_batch`` and ``train.eval_batches``,
so the loss is the ``val_loss`` the trainer logged at that step. ``data=<option>`` / ``data.*`` overrides
choose other text (``data.*`` alone edit the run's recorded data); it is always tokenized with the model's
own tokenizer, never a newly trained one.

How the trainer averages (``trainer.training.steps``): each data-parallel rank takes the mean of its
micro-batches' mean token losses, and the ranks' means are averaged (DeepSpeed's pipeline engine does
the same per micro-batch). Every micro-batch holds micro_batch·seq_len target tokens, so that is the
mean over every token of the set, which this computes (in fp64, from fp32 micro-batch means). The
padding rows a tensor-parallel layout added to the vocabulary stay in the softmax, as in training.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from trainer.config.schema import BadInput, ConfigError, DataConfig

USAGE = __doc__.split("\n\n")[1]
SPLITS = ("val", "train")
MODEL_TOKENIZER = "checkpoint"  # data.tokenizer.source: the model's own tokenizer


@dataclass
class EvaluateConfig:
    """``conf/evaluate.yaml``; every key is a command-line override (README, "Using a trained model")."""

    ckpt: str = ""  # a step directory, checkpoints directory or run directory, or a Hugging Face model directory
    # The text, used only when the command line names data (data=<option> or data.* keys); otherwise the
    # run's own data as its checkpoint recorded them. data.tokenizer.source stays "checkpoint": the
    # model's own tokenizer (a path is accepted only for a Hugging Face directory that has none).
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "val"  # val (held out) | train, of the prepared data
    # "run" = the run's train.eval_batches (10 for a Hugging Face directory); N global batches of samples
    # from the split's start, wrapping round a shorter split, as the trainer takes them; "all" = every sample.
    eval_batches: str = "run"
    seq_len: int | None = None  # tokens per sample; null = the run's model.seq_len (the model's context)
    global_batch: int | None = None  # samples per batch; null = the run's parallel.global_batch (else 8)
    micro_batch: int | None = None  # samples per forward pass; null = the run's parallel.micro_batch (else 4)
    device: str = "auto"  # auto (cuda if visible) | cpu | cuda
    out: str = ""  # also write the result as JSON here


def register() -> None:
    """Make the evaluation's typed schema and the resolvers known to Hydra (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from trainer.config.rundir import register_resolvers

    register_resolvers()
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def check(cfg: EvaluateConfig) -> None:
    """What can be checked without reading the model or the data; ConfigError (one line) otherwise."""
    if not cfg.ckpt:
        raise ConfigError("ckpt", cfg.ckpt, "give a checkpoint (step, checkpoints or run directory) or an HF directory")
    if not Path(cfg.ckpt).exists():
        raise ConfigError("ckpt", cfg.ckpt, "no such file or directory")
    if cfg.split not in SPLITS:
        raise ConfigError("split", cfg.split, f"must be one of {', '.join(SPLITS)}")
    if cfg.eval_batches not in ("run", "all") and not (cfg.eval_batches.isdigit() and int(cfg.eval_batches) > 0):
        raise ConfigError("eval_batches", cfg.eval_batches, "must be run, all or a number of batches >= 1")
    for key in ("seq_len", "global_batch", "micro_batch"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(key, value, "must be >= 1 (or null: the run's)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", cfg.device, "must be auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", cfg.device, "no CUDA device is visible; use device=auto or cpu")
    if cfg.data.tokenizer.source == "train":
        fix = "evaluation never trains a tokenizer; leave it at checkpoint (the model's)"
        raise ConfigError("data.tokenizer.source", "train", fix)


# --- what the model and its run recorded ----------------------------------------------------------------


@dataclass
class Recorded:
    """What the model directory says about the model and the run that trained it (nothing read in bulk)."""

    path: Path  # the step directory, or the Hugging Face directory
    is_hf: bool
    tokenizer: Path | None  # tokenizer.json or a directory holding one
    context: int  # the model's seq_len
    data: DataConfig | None  # the run's data (None: no config.yaml, e.g. an import or a Hugging Face directory)
    seq_len: int | None = None
    global_batch: int | None = None
    micro_batch: int | None = None
    eval_batches: int | None = None


def read_recorded(path: Path) -> Recorded:
    from trainer.checkpoint import consolidate
    from trainer.checkpoint import store as checkpoint
    from trainer.hf.export import find_step_dir
    from trainer.model import ModelShape

    if (path / "config.json").is_file() and not (path / consolidate.META_FILE).is_file():
        from trainer.hf import convert as hf
        from trainer.hf.importer import read_config

        config = read_config(path)
        shape = ModelShape.from_meta(hf.family_for(config).model_meta(config))
        tokenizer = path if (path / "tokenizer.json").is_file() else None
        return Recorded(path, True, tokenizer, shape.seq_len, None)
    step_dir = find_step_dir(path)
    try:
        context = int(consolidate.read_meta(step_dir)["model"]["seq_len"])
    except (ValueError, KeyError, TypeError) as err:
        raise BadInput(f"checkpoint {step_dir}: unreadable meta.json ({err})") from None
    tokenizer = step_dir / checkpoint.TOKENIZER_DIR
    recorded = Recorded(step_dir, False, tokenizer if (tokenizer / "tokenizer.json").is_file() else None, context, None)
    if (step_dir / "config.yaml").is_file():
        _read_run_config(step_dir / "config.yaml", recorded)
    return recorded


def _read_run_config(path: Path, recorded: Recorded) -> None:
    """The run's data and validation geometry from its resolved config.yaml (read leniently: a config of
    an older trainer may lack keys or hold ones this one dropped)."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.load(path)
        run_data = node.get("data") or {}
        known = {key: run_data[key] for key in OmegaConf.structured(DataConfig) if key in run_data}
        recorded.data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), known))
        for attr, key in (
            ("seq_len", "model.seq_len"),
            ("global_batch", "parallel.global_batch"),
            ("micro_batch", "parallel.micro_batch"),
            ("eval_batches", "train.eval_batches"),
        ):
            value = OmegaConf.select(node, key)
            setattr(recorded, attr, None if value is None else int(value))
    except Exception as err:  # yaml or type errors: a damaged file
        raise BadInput(f"{path}: unreadable run config ({' '.join(str(err).split())})") from None


# --- the data -------------------------------------------------------------------------------------------


def choose_data(cfg: EvaluateConfig, recorded: Recorded, data_overrides: list) -> tuple[DataConfig, str]:
    """(the data to evaluate on, a description). ``data_overrides``: the command line's Hydra overrides of
    ``data`` or ``data.*``; with a ``data=<option>`` choice the composed ``cfg.data`` is used, with
    ``data.*`` keys alone they edit the run's recorded data."""
    if any(o.key_or_group == "data" for o in data_overrides):
        return cfg.data, _describe(cfg.data)
    if recorded.data is None:
        what = "is a Hugging Face directory" if recorded.is_hf else "has no config.yaml (an import?)"
        raise BadInput(
            f"{recorded.path} {what}: no data recorded to evaluate on; give some, "
            "e.g. data=files 'data.paths=[text.txt]'"
        )
    if not data_overrides:
        return recorded.data, f"the run's data ({_describe(recorded.data)})"
    edited = _edited(recorded.data, data_overrides)
    return edited, f"the run's data, edited ({_describe(edited)})"


def _edited(data: DataConfig, overrides: list) -> DataConfig:
    from omegaconf import OmegaConf

    node = OmegaConf.structured(data)
    try:
        for override in overrides:
            OmegaConf.update(node, override.key_or_group.removeprefix("data."), override.value(), merge=True)
        return OmegaConf.to_object(node)
    except Exception as err:  # a wrong type for a key
        raise BadInput(f"config error: {' '.join(str(err).split())}") from None


def _describe(data: DataConfig) -> str:
    where = {"pystdlib": "the standard library", "files": list(data.paths), "hub": data.hub_name}
    return f"{data.source} {where.get(data.source, '')}".strip()


def check_data(data: DataConfig) -> None:
    """The data keys a preparation needs, checked as the trainer checks them (the tokenizer is checked apart).
    Evaluation tokenizes one text source; a blend or Megatron files are refused rather than silently replaced
    by the single source their config also holds."""
    from trainer.config.validate import validate_source

    if data.blend or data.source == "megatron":
        key, value = ("data.blend", "[...]") if data.blend else ("data.source", data.source)
        fix = "evaluation reads one text source (pystdlib, files, hub); give one, e.g. data=files 'data.paths=[...]'"
        raise ConfigError(key, value, fix)
    validate_source(data)


def requested_tokenizer(cfg: EvaluateConfig, data_overrides: list) -> str | None:
    """The tokenizer the command line asks for (None: it names none, so the model's own)."""
    if any(o.key_or_group == "data" for o in data_overrides):
        return cfg.data.tokenizer.source
    named = [o for o in data_overrides if o.key_or_group == "data.tokenizer.source"]
    return cfg.data.tokenizer.source if named else None


def choose_tokenizer(requested: str | None, recorded: Recorded) -> Path:
    """The model's own tokenizer; a path in data.tokenizer.source only for a model that has none."""
    own = recorded.tokenizer
    if requested in (None, MODEL_TOKENIZER) or (own is not None and requested == str(own)):
        if own is None:
            raise BadInput(
                f"{recorded.path} holds no tokenizer.json; give the model's tokenizer with data.tokenizer.source=PATH"
            )
        return own
    if own is not None:
        fix = "the model's own tokenizer is always used; leave it at checkpoint"
        raise ConfigError("data.tokenizer.source", requested, fix)
    if not Path(requested).exists():
        raise ConfigError("data.tokenizer.source", requested, "no such file or directory")
    return Path(requested)


def prepare_with(data: DataConfig, tokenizer: Path, log, recorded: bool = False):
    """The prepared data tokenized with ``tokenizer``: for the run's ``recorded`` data, its own cache when
    that still holds the very same tokenizer (as after training); else prepared anew (never training a
    tokenizer)."""
    from trainer.data import prepare as prep
    from trainer.data.setup import _exclusive

    tok_file = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    try:
        with _exclusive(Path(data.cache_dir) / ".prepare.lock"):
            if recorded:  # the run's data as recorded: is its preparation still there?
                cached = prep._load_cached(prep.cache_directory(data), prep.cache_key(data))
                same = (
                    cached is not None
                    and (cached.tokenizer_dir / "tokenizer.json").read_bytes() == tok_file.read_bytes()
                )
                if same:
                    log(f"data: using cached {cached.directory} (the run's own, same tokenizer)")
                    return cached
            mine = replace(data, tokenizer=replace(data.tokenizer, source=str(tokenizer)))
            return prep.prepare(mine, log)
    except (ValueError, OSError) as err:  # the data pipeline reports unusable corpora this way
        raise BadInput(f"data error: {' '.join(str(err).split())}") from None


# --- the evaluation -------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    loss: float
    ppl: float
    tokens: int  # target tokens evaluated (repeats included, where the set wraps round a short split)
    samples: int  # samples evaluated (each seq_len targets)
    distinct_samples: int  # of them different (the split's size, if the set wrapped round it)
    seq_len: int
    global_batch: int
    micro_batch: int
    eval_batches: int | str  # global batches, or "all"
    split: str
    data: str  # what text, in words
    tokenizer: str
    source: str  # the model
    step: int | None

    def line(self) -> str:
        batches = "all samples" if self.eval_batches == "all" else f"{self.eval_batches} x {self.global_batch} samples"
        wrapped = f", {self.distinct_samples} distinct" if self.distinct_samples < self.samples else ""
        return (
            f"loss {self.loss:.6f}  ppl {self.ppl:.3f}  tokens {self.tokens:,} ({batches}{wrapped} of seq_len "
            f"{self.seq_len}) | {self.split} split of {self.data}, tokenized with the model's own tokenizer "
            f"{self.tokenizer} | model {self.source}"
        )


def evaluate(cfg: EvaluateConfig, data_overrides: list, log=print) -> Evaluation:
    """``cfg`` checked (``check``); ``data_overrides`` as ``choose_data`` takes them."""
    from trainer.data.stream import TokenFile
    from trainer.inference.load import load
    from trainer.training.record import perplexity

    recorded = read_recorded(Path(cfg.ckpt))
    data, described = choose_data(cfg, recorded, data_overrides)
    check_data(data)
    tokenizer = choose_tokenizer(requested_tokenizer(cfg, data_overrides), recorded)
    seq_len, global_batch, micro_batch, eval_batches = _geometry(cfg, recorded)
    from_run = not any(o.key_or_group == "data" for o in data_overrides)
    prepared = prepare_with(data, tokenizer, log, recorded=from_run)
    try:
        tokens = TokenFile(prepared.val_path if cfg.split == "val" else prepared.train_path, prepared.dtype)
    except ValueError as err:
        raise BadInput(str(err)) from None
    indices = _sample_indices(tokens.num_samples(seq_len), seq_len, global_batch, eval_batches, cfg.split, described)

    loaded = load(Path(cfg.ckpt))
    if prepared.vocab_size > loaded.shape.vocab_size:
        raise BadInput(f"the tokenizer has {prepared.vocab_size} tokens, the model only {loaded.shape.vocab_size}")
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if on_gpu else "cpu")
    # Padding rows a checkpoint may hold are in no softmax (trainer.model.layers.mask_padding): the loaded model,
    # which drops them, computes the loss the trainer logged.
    model = loaded.model.to(device)
    loss = mean_loss(model, tokens, indices, seq_len, micro_batch, device)
    return Evaluation(
        loss=loss,
        ppl=perplexity(loss),
        tokens=len(indices) * seq_len,
        samples=len(indices),
        distinct_samples=len(set(indices.tolist())),
        seq_len=seq_len,
        global_batch=global_batch,
        micro_batch=micro_batch,
        eval_batches=eval_batches,
        split=cfg.split,
        data=described,
        tokenizer=str(tokenizer),
        source=loaded.source,
        step=loaded.step,
    )


def _geometry(cfg: EvaluateConfig, recorded: Recorded) -> tuple[int, int, int, int | str]:
    """(seq_len, global_batch, micro_batch, eval_batches): the command line's, else the run's, else defaults."""
    from trainer.config.schema import ParallelConfig, TrainConfig

    pick = lambda mine, run, default: mine if mine is not None else run if run is not None else default  # noqa: E731
    seq_len = pick(cfg.seq_len, recorded.seq_len, recorded.context)
    global_batch = pick(cfg.global_batch, recorded.global_batch, ParallelConfig.global_batch)
    micro_batch = pick(cfg.micro_batch, recorded.micro_batch, ParallelConfig.micro_batch)
    if cfg.micro_batch is None and global_batch % micro_batch:
        micro_batch = math.gcd(global_batch, micro_batch)  # the run's micro-batch does not divide a new batch
    if seq_len > recorded.context:
        raise ConfigError("seq_len", seq_len, f"must be <= the model's context, {recorded.context}")
    if global_batch % micro_batch:
        raise ConfigError("micro_batch", micro_batch, f"must divide global_batch={global_batch}")
    if cfg.eval_batches == "all":
        return seq_len, global_batch, micro_batch, "all"
    batches = int(cfg.eval_batches) if cfg.eval_batches != "run" else recorded.eval_batches
    return seq_len, global_batch, micro_batch, batches if batches is not None else TrainConfig.eval_batches


def _sample_indices(num_samples: int, seq_len: int, global_batch: int, eval_batches, split: str, data: str):
    """Which samples, in order: the trainer's validation set (``trainer.data.stream.eval_batches``: the
    first eval_batches·global_batch samples, wrapping round), or every sample."""
    import numpy as np

    if eval_batches == "all":
        if num_samples == 0:
            raise BadInput(
                f"data: the {split} split of {data} holds fewer than seq_len+1={seq_len + 1} tokens; "
                "give more text or a smaller seq_len"
            )
        return np.arange(num_samples)
    if num_samples < global_batch:
        raise BadInput(
            f"data: the {split} split of {data} holds {num_samples} samples of seq_len+1={seq_len + 1} tokens, "
            f"fewer than one global batch of {global_batch}; give more text, a smaller global_batch or seq_len, "
            "or eval_batches=all"
        )
    return np.arange(eval_batches * global_batch) % num_samples


def mean_loss(model, tokens, indices, seq_len: int, micro_batch: int, device) -> float:
    """Mean cross entropy over every target token of the samples ``indices``, in micro-batches."""
    from trainer.data.stream import make_batch

    total, count = 0.0, 0
    for start in range(0, len(indices), micro_batch):
        x, y = make_batch(tokens, indices[start : start + micro_batch], seq_len)
        loss = model(x.to(device), y.to(device)).float().item()  # the micro-batch's mean, as the trainer's
        total += loss * y.numel()
        count += y.numel()
    return total / count


# --- the command line -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.evaluate``: one summary line; bad input is one line on stderr and exit code 2."""
    from trainer.config.cli import _overrides, check_command_line, exit_bad_input

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        flags = [arg for arg in argv if arg.startswith("-")]
        if flags:
            raise BadInput(f"unknown option {flags[0]}; give key=value overrides, e.g. ckpt=runs/<id>")
        register()
        configs: list[EvaluateConfig] = []
        check_command_line(argv, "evaluate", lambda cfg: (check(cfg), configs.append(cfg)))
        if len(configs) != 1:
            sweep = next(o for o in _overrides(argv) if o.is_sweep_override())
            raise ConfigError(sweep.key_or_group, sweep.input_line.split("=", 1)[1], "one value per evaluation")
        data_overrides = [o for o in _overrides(argv) if o.key_or_group.split(".")[0] == "data"]
        result = evaluate(configs[0], data_overrides)
    except BadInput as err:
        exit_bad_input(err)
    print(result.line())
    if configs[0].out:
        out = Path(configs[0].out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_jsonable(asdict(result)), indent=2) + "\n")
    return 0


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}

"""Decoding speed on one process: the trainer's decoder with its key/value cache, without it, and
``transformers``' ``generate()`` on the same weights (converted exactly, as ``trainer.export`` does).

    .venv/bin/python benchmarks/decode_speed.py [--model gpt2-small] [--prompt 64] [--new 128] [--runs 5]

The model is built from its config with random weights (speed does not depend on them), greedy, batch 1,
fp32 on CPU (bf16 on a GPU with --device cuda). Prints tokens/s of the new tokens, the median of ``--runs``
runs, each after one warm-up run. Both families: ``--model llama-tiny`` or any conf/model name.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.hf import convert as hf  # noqa: E402
from trainer.inference.decode import Sampling, generate  # noqa: E402
from trainer.model import GPT, ModelShape  # noqa: E402


def shape_of(name: str, seq_len: int) -> ModelShape:
    from omegaconf import OmegaConf

    model = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    return ModelShape.from_config(
        OmegaConf.merge({"dropout": 0.0, "make_vocab_size_divisible_by": 1}, model, {"seq_len": seq_len})
    )


def transformers_twin(model: GPT, shape: ModelShape):
    """The same weights in the transformers class of the model's family."""
    import transformers

    family = hf.family_of(shape)
    config = getattr(transformers, family.config_class)(**family.hf_config(shape, None))
    net = getattr(transformers, family.hf_class)(config)
    missing, unexpected = net.load_state_dict(hf.to_hf(model.state_dict(), shape), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    net.generation_config.eos_token_id = None
    net.generation_config.pad_token_id = 0
    return net.eval()


def timed(run, new: int, runs: int) -> float:
    run()  # warm-up
    speeds = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        speeds.append(new / (time.perf_counter() - started))
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = shape_of(args.model, args.prompt + args.new)
    model = GPT(shape, seed=0).eval()
    net = transformers_twin(model, shape).to(device, dtype)
    model.to(device, dtype)
    prompt = torch.randint(0, shape.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = Sampling(args.new, temperature=0.0)
    ids = torch.tensor([prompt], device=device)

    def theirs():
        with torch.no_grad():
            return net.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)

    same = generate(model, prompt, greedy) == theirs()[0, args.prompt :].tolist()
    rows = {
        "trainer, key/value cache": timed(lambda: generate(model, prompt, greedy), args.new, args.runs),
        "trainer, no cache": timed(lambda: generate(model, prompt, greedy, cache=False), args.new, args.runs),
        "transformers generate()": timed(theirs, args.new, args.runs),
    }
    print(
        f"{args.model} ({model.num_params():,} parameters), {device.type} {str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads: prompt {args.prompt}, {args.new} new tokens, greedy, median of {args.runs}"
    )
    print(f"same tokens as transformers: {same}")
    print("| decoder | new tokens/s |\n|---|---|")
    for name, speed in rows.items():
        print(f"| {name} | {speed:,.1f} |")


if __name__ == "__main__":
    main()

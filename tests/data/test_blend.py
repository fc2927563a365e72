"""data.blend: several sources mixed by weight (trainer/data/blend.py).

Sources here are token files whose tokens name their source and position (source i holds
``i * 100_000 + t`` at token t), so every sample a stream returns says where it came from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import compose_config, read_metrics, run_train, small_corpus
from trainer.config.schema import ConfigError
from trainer.data.blend import BlendedData, BlendedStream, blend_sources, blended_eval_batches
from trainer.data.stream import TokenFile

SEQ = 4
WEIGHTS = (0.5, 0.3, 0.2)


def _files(tmp_path, samples=(700, 1900, 400)) -> list[TokenFile]:
    """Three token files of very different sizes (none in proportion to its weight)."""
    files = []
    for i, n in enumerate(samples):
        path = tmp_path / f"source{i}.bin"
        (i * 100_000 + np.arange(n * SEQ + 1)).astype(np.uint32).tofile(path)
        files.append(TokenFile(path, "uint32"))
    return files


def _origin(x) -> list[tuple[int, int]]:
    """(source, sample index) of each row of an input batch."""
    first = x[:, 0].tolist()
    return [(t // 100_000, t % 100_000 // SEQ) for t in first]


def _stream(files, micro=2, accum=2, rank=0, dp=1, seed=7, weights=WEIGHTS) -> BlendedStream:
    return BlendedStream(files, weights, SEQ, micro, accum, rank, dp, seed)


def _global_sequence(files, steps: int, micro: int, accum: int, dp: int) -> list[tuple[int, int]]:
    """Every sample of ``steps`` optimizer steps, in global order (rank 0's share of a step first)."""
    streams = [_stream(files, micro, accum, rank, dp) for rank in range(dp)]
    out = []
    for _ in range(steps):
        for stream in streams:
            for _ in range(accum):
                x, y = stream.next_micro_batch()
                assert (x[:, 1:] == y[:, :-1]).all()
                out += _origin(x)
    return out


def test_shares_over_an_epoch_are_the_weights(tmp_path):
    files = _files(tmp_path)
    stream = _stream(files)
    assert stream.num_samples == 3000
    seen = _global_sequence(files, stream.steps_per_epoch, 2, 2, 1)
    counts = np.bincount([s for s, _ in seen], minlength=3)
    shares = counts / counts.sum()
    print(f"\nshares over one epoch of {counts.sum()} samples: {shares.round(4).tolist()} for weights {WEIGHTS}")
    assert np.abs(shares - WEIGHTS).max() < 0.01
    # Every global batch is mixed too, and a source's samples are all visited before any repeats.
    for step in range(0, len(seen), 40):
        window = np.bincount([s for s, _ in seen[step : step + 40]], minlength=3) / 40
        assert np.abs(window - WEIGHTS).max() <= 1 / 40 + 1e-9
    source2 = [i for s, i in seen if s == 2]  # 400 samples, weight 0.2 of 3000 = 600: one full cycle first
    assert sorted(source2[:400]) == list(range(400)) and len(set(source2)) == 400
    source1 = [i for s, i in seen if s == 1]  # 1900 samples, 900 drawn: no repeats
    assert len(set(source1)) == len(source1) == 900


def test_same_global_sequence_at_one_and_two_data_parallel_ranks(tmp_path):
    files = _files(tmp_path, samples=(30, 50, 20))  # 100 samples: 12 steps of 8 cross two epochs
    one = _global_sequence(files, 30, micro=2, accum=4, dp=1)
    two = _global_sequence(files, 30, micro=2, accum=2, dp=2)
    four = _global_sequence(files, 30, micro=1, accum=2, dp=4)
    assert one == two == four
    # Another seed, another order; the same seed, the same order.
    other = BlendedStream(files, WEIGHTS, SEQ, 8, 1, 0, 1, seed=8)
    assert _origin(other.next_micro_batch()[0]) != one[:8]


@pytest.mark.parametrize("stop_after", [5, 49])  # mid-step in epoch 0; mid-step near the epoch end
def test_resume_mid_epoch_gives_the_same_next_samples(tmp_path, stop_after):
    files = _files(tmp_path, samples=(70, 110, 40))
    straight = _stream(files, micro=2, accum=3)
    interrupted = _stream(files, micro=2, accum=3)
    for _ in range(stop_after):
        straight.next_micro_batch()
        interrupted.next_micro_batch()
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
    assert state["micro"] == stop_after % 3 and state["blend"][1][1] == 110
    resumed = _stream(files, micro=2, accum=3)
    resumed.load_state_dict(state)
    for _ in range(40):  # across the epoch boundary
        a, b = straight.next_micro_batch(), resumed.next_micro_batch()
        assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    with pytest.raises(ValueError, match="same data.blend"):
        _stream(files, micro=2, accum=3, weights=(0.4, 0.4, 0.2)).load_state_dict(state)


def test_validation_mixes_each_source_split_by_weight(tmp_path):
    files = _files(tmp_path, samples=(30, 50, 20))
    batches = list(blended_eval_batches(files, WEIGHTS, SEQ, 20, 5, 0, 1, 3))
    seen = [o for x, _ in batches for o in _origin(x)]
    assert len(seen) == 60 and np.bincount([s for s, _ in seen]).tolist() == [30, 18, 12]
    assert [i for s, i in seen if s == 2] == list(range(12))  # file order, as single-source validation
    halves = [list(blended_eval_batches(files, WEIGHTS, SEQ, 20, 5, r, 2, 3)) for r in range(2)]
    assert sorted(o for h in halves for x, _ in h for o in _origin(x)) == sorted(seen)
    with pytest.raises(ValueError, match="fewer than its"):
        list(blended_eval_batches(files, (0.1, 0.1, 0.8), SEQ, 40, 5, 0, 1, 1))


@pytest.mark.parametrize(
    ("blend", "key"),
    [
        ([], "data.blend"),
        ([{"weight": 0.5, "data": "pystdlib"}, {"weight": 0, "data": "pystdlib", "name": "b"}], "data.blend[1].weight"),
        ([{"weight": -1, "data": "pystdlib"}], "data.blend[0].weight"),
        ([{"weight": 1, "data": "no-such-corpus"}], "data.blend[0].data"),
        ([{"weight": 1}], "data.blend[0]"),
        ([{"weight": 1, "data": "pystdlib"}, {"weight": 1, "data": "pystdlib"}], "data.blend"),
    ],
)
def test_bad_blends_are_refused_in_one_line(blend, key):
    cfg, _ = compose_config(["data=blend"])
    cfg.data.blend = blend
    with pytest.raises(ConfigError) as err:
        blend_sources(cfg.data)
    assert err.value.key == key and "\n" not in str(err.value)


def test_blend_entries_from_the_command_line(tmp_path):
    cfg, _ = compose_config(
        ["data=blend", f"data.blend=[{{weight:3,data:pystdlib,max_documents:40}},{{weight:1,paths:[{tmp_path}]}}]"]
    )
    (w0, a), (w1, b) = blend_sources(cfg.data)
    assert (w0, w1) == (0.75, 0.25)
    assert (a.name, a.source, a.max_documents) == ("pystdlib", "pystdlib", 40)
    assert (b.name, b.source, b.paths) == ("source1", "files", [str(tmp_path)])
    assert a.cache_dir == b.cache_dir == cfg.data.cache_dir and a.blend == []


def _corpora(tmp_path) -> list:
    """Three small real corpora: slices of Tiny Shakespeare (or stdlib sources) and this test file."""
    text = small_corpus(tmp_path).read_text()
    paragraphs = text.split("\n\n")
    third = len(paragraphs) // 3
    paths = []
    for i in range(3):
        path = tmp_path / "corpora" / f"c{i}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n\n".join(paragraphs[i * third : (i + 1) * third][: 400 + 300 * i]))
        paths.append(path)
    return paths


def test_training_on_a_blend_from_the_cli(tmp_path, data_cache):
    a, b, c = _corpora(tmp_path)
    blend = f"data.blend=[{{weight:0.5,paths:[{a}]}},{{weight:0.3,paths:[{b}]}},{{weight:0.2,name:third,paths:[{c}]}}]"
    overrides = ["debug=smoke", "data=blend", blend, f"data.cache_dir={data_cache}", "data.tokenizer.vocab_size=400"]
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, [*overrides, "train.steps=4", "train.save_interval=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained byte-level BPE" in proc.stdout and "blend source third: weight 0.2000" in proc.stdout
    records = read_metrics(run_dir)
    assert any("val_loss" in r for r in records) and max(r["step"] for r in records if "loss" in r) == 4

    # The same tokenizer and caches at once; a resume from step 2 reads the blended stream's saved position.
    cfg, _ = compose_config([*overrides])
    from trainer.data.setup import prepare_data

    prepared = prepare_data(cfg)
    assert isinstance(prepared, BlendedData) and prepared.names == ("source0", "source1", "third")
    assert len({p.tokenizer_dir.joinpath("tokenizer.json").read_bytes() for p in prepared.sources}) == 1
    resumed = tmp_path / "resumed"
    proc = run_train(resumed, [*overrides, "train.steps=4", f"train.resume={run_dir}/checkpoints/step_2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    again = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert again[4] == pytest.approx(losses[4], rel=1e-5)


def test_blend_with_unknown_source_is_refused_before_training(tmp_path, data_cache):
    proc = run_train(tmp_path / "run", ["debug=smoke", "data=blend", "data.blend=[{weight:1,data:nope}]"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.blend[0].data='nope'" in lines[0], proc.stderr


def _tokenizer_model(directory) -> dict:
    return json.loads((directory / "tokenizer.json").read_text())["model"]


@pytest.mark.parametrize("train_bytes", [0, 6000])
def test_blend_tokenizer_is_fitted_on_the_weighted_mix(tmp_path, train_bytes):
    """All training documents of every source (0), or each source's weight of ``train_bytes`` spread over it."""
    from trainer.data import prepare as prep
    from trainer.data.blend import _blend_tokenizer
    from trainer.data.tokenizer import train_bpe

    from .test_prepare import cfg_for

    paths = _corpora(tmp_path)
    data = cfg_for(tmp_path, [], source="files")
    data.tokenizer.train_bytes = train_bytes
    sources = [(w, cfg_for(tmp_path, [p], name=f"s{i}")) for i, (w, p) in enumerate(zip(WEIGHTS, paths))]
    expected = []
    for weight, source in sources:
        nonempty = [doc for doc in prep.iter_documents(source) if doc]
        train = prep.split_documents(nonempty, source.val_fraction)[0]
        if train_bytes:
            budget = round(weight * train_bytes)
            train = list(prep.bpe_sample(train, budget, prep.bpe_sample_fraction(source, budget)))
            assert 0.6 * budget < sum(len(d.encode()) for d in train) <= budget  # about its share of the budget
        expected += train
    got = _blend_tokenizer(sources, data, log=lambda _: None)
    assert _tokenizer_model(got) == json.loads(train_bpe(expected, 400).to_str())["model"]

"""trainer.runtime.compat: the version check, and that every restorable patch restores exactly what
was there (on small stand-ins for the DeepSpeed objects; the real engines are covered by the pipeline,
bubble, non-finite and checkpoint tests)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from datetime import timedelta
from types import SimpleNamespace

import deepspeed
import pytest
import torch
import torch.distributed.distributed_c10d as c10d

from trainer.runtime import compat


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(compat, "_warned", set())


def test_version_check_passes_silently_on_the_tested_version(monkeypatch):
    monkeypatch.setattr(deepspeed, "__version__", compat.DEEPSPEED_VERSION)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version("p", SimpleNamespace(a=1), "a")
        monkeypatch.setattr(deepspeed, "__version__", "0.19.2")  # another patch release: same minor
        compat.check_version("p", SimpleNamespace(a=1), "a")


def test_version_check_warns_once_per_patch_on_another_minor(monkeypatch):
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    owner = SimpleNamespace(a=1)
    with pytest.warns(RuntimeWarning, match=r"'p'.*deepspeed 0\.19\.8.*0\.20\.1"):
        compat.check_version("p", owner, "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version("p", owner, "a")  # the same patch: no second warning
    with pytest.warns(RuntimeWarning, match="'q'"):
        compat.check_version("q", owner, "a")


def test_version_check_raises_on_a_missing_attribute_naming_patch_and_versions(monkeypatch):
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(RuntimeError, match=r"'p'.*deepspeed 0\.21\.0 has no 'gone'.*deepspeed 0\.19\.8"):
        compat.check_version("p", SimpleNamespace(a=1), "a", "gone")
    with pytest.raises(RuntimeError, match="'gone' \\(key\\)"):
        compat.check_version("p", {"a": 1}, "gone")
    assert compat._warned == set()  # raised before warning


def test_version_check_of_torch_uses_the_torch_version(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "3.0.0")
    with pytest.warns(RuntimeWarning, match=r"torch 2\.13\.0.*3\.0\.0"):
        compat.check_version("t", c10d, "default_pg_timeout", library="torch")


class FakeEngine:
    """A stand-in for PipelineEngine: a class-level instruction map of plain functions."""

    class ForwardPass:
        pass

    class BackwardPass:
        pass

    def _exec_forward(self, **kwargs):
        return ("forward", kwargs)

    def _exec_backward(self, **kwargs):
        return ("backward", kwargs)

    _INSTRUCTION_MAP = {ForwardPass: _exec_forward, BackwardPass: _exec_backward}


def _run(engine, kind, **kwargs):
    return engine._INSTRUCTION_MAP[kind](engine, **kwargs)


def _tagging(tag, seen):
    def wrap(name, handler):
        def run(engine, **kwargs):
            seen.append((tag, name))
            return handler(engine, **kwargs)

        return run

    return wrap


def test_wrap_pipe_instructions_wraps_and_restores_the_class_map():
    engine, seen = FakeEngine(), []
    class_map = dict(FakeEngine._INSTRUCTION_MAP)
    restore = compat.wrap_pipe_instructions(engine, _tagging("t", seen))
    assert _run(engine, FakeEngine.ForwardPass, buffer_id=1) == ("forward", {"buffer_id": 1})
    assert seen == [("t", "ForwardPass")]
    assert FakeEngine._INSTRUCTION_MAP == class_map  # the class is untouched, only this instance
    restore()
    assert "_INSTRUCTION_MAP" not in vars(engine)
    assert engine._INSTRUCTION_MAP is FakeEngine._INSTRUCTION_MAP
    restore()  # a second call changes nothing
    assert "_INSTRUCTION_MAP" not in vars(engine)


def test_stacked_instruction_wrappers_restore_in_reverse_order_only():
    engine, seen = FakeEngine(), []
    outer_restore = compat.wrap_pipe_instructions(engine, _tagging("meter", seen))
    meter_map = engine._INSTRUCTION_MAP
    inner_restore = compat.wrap_pipe_instructions(engine, _tagging("tap", seen))
    _run(engine, FakeEngine.BackwardPass)
    assert seen == [("tap", "BackwardPass"), ("meter", "BackwardPass")]
    with pytest.raises(RuntimeError, match="patched again"):
        outer_restore()  # would drop the later wrappers
    inner_restore()
    assert engine._INSTRUCTION_MAP is meter_map
    outer_restore()
    assert "_INSTRUCTION_MAP" not in vars(engine)


def test_wrap_pipe_instructions_needs_the_map():
    with pytest.raises(RuntimeError, match="_INSTRUCTION_MAP"):
        compat.wrap_pipe_instructions(SimpleNamespace(), _tagging("t", []))


def _zero0_engine():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    engine = SimpleNamespace(optimizer=optimizer, skipped_steps=0, _take_model_step=lambda: None)
    return engine, param


def test_optimizer_step_patch_skips_when_told_and_restores_the_original_step():
    engine, param = _zero0_engine()
    optimizer = engine.optimizer
    assert "step" not in vars(optimizer) and not hasattr(optimizer, "overflow")
    verdicts = iter([True, False])
    restore = compat.skip_optimizer_step_when(engine, lambda: next(verdicts))
    assert optimizer.overflow is False

    param.grad = torch.ones(3)
    optimizer.step()  # skipped: no update, gradients dropped, the engine told
    assert optimizer.overflow is True and param.grad is None
    torch.testing.assert_close(param.detach(), torch.ones(3))
    param.grad = torch.ones(3)
    optimizer.step()  # applied
    assert optimizer.overflow is False
    torch.testing.assert_close(param.detach(), torch.zeros(3))

    restore()
    assert "step" not in vars(optimizer) and not hasattr(optimizer, "overflow")
    assert optimizer.step.__func__ is type(optimizer).step
    param.grad = torch.ones(3)
    optimizer.step()
    torch.testing.assert_close(param.detach(), -torch.ones(3))


def test_optimizer_step_patch_restores_a_stale_overflow_flag_away():
    engine, param = _zero0_engine()
    restore = compat.skip_optimizer_step_when(engine, lambda: True)
    param.grad = torch.ones(3)
    engine.optimizer.step()
    assert engine.optimizer.overflow is True
    restore()  # else DeepSpeed would count every later step as skipped
    assert not hasattr(engine.optimizer, "overflow")


def test_fp32_clipping_patch_reports_the_norm_and_restores_the_method():
    class Engine:
        def __init__(self):
            self._global_grad_norm = None

        def clip_fp32_gradients(self):
            return "deepspeed's"

    engine = Engine()
    restore = compat.replace_fp32_clipping(engine, lambda: torch.tensor(2.5))
    assert engine.clip_fp32_gradients() is None
    assert float(engine._global_grad_norm) == 2.5
    restore()
    assert "clip_fp32_gradients" not in vars(engine)
    assert engine.clip_fp32_gradients() == "deepspeed's"
    with pytest.raises(RuntimeError, match="clip_fp32_gradients"):
        compat.replace_fp32_clipping(SimpleNamespace(_global_grad_norm=None), lambda: 0.0)


def test_default_pg_timeout_patch_restores_torch_defaults():
    before = (c10d.default_pg_timeout, c10d.default_pg_nccl_timeout)
    restore = compat.set_default_pg_timeout(timedelta(seconds=42))
    try:
        assert c10d.default_pg_timeout == c10d.default_pg_nccl_timeout == timedelta(seconds=42)
        assert c10d._get_default_timeout("gloo") == timedelta(seconds=42)  # what new_group reads
    finally:
        restore()
    assert (c10d.default_pg_timeout, c10d.default_pg_nccl_timeout) == before


def test_shm_comm_patch_marks_the_op_unavailable_and_restores_it():
    import deepspeed.ops

    ops = deepspeed.ops.__compatible_ops__
    before = ops["deepspeed_shm_comm"]
    restore = compat.skip_shm_comm_op()
    try:
        assert ops["deepspeed_shm_comm"] is False
    finally:
        restore()
    assert ops["deepspeed_shm_comm"] == before


def test_muon_module_imports_without_inductor_and_compiles_at_first_call():
    # A process of its own: which modules are imported is process state.
    code = """
import sys, torch
from deepspeed.runtime import compiler
from trainer.runtime import compat
before = compiler.compile
compat.defer_muon_compilation()
assert compiler.compile is before and compat.MUON_MODULE in sys.modules
assert "torch._inductor.compile_fx" not in sys.modules
from deepspeed.runtime.zero.muon import original_muon
compiled = []
torch.compile = lambda fn, **kwargs: compiled.append(fn) or fn  # records what the first call compiles
newton_schulz = original_muon.zeropower_via_newtonschulz5
g = torch.randn(8, 4)
out = newton_schulz(g, steps=2)
assert compiled == [newton_schulz.__wrapped__] and torch.equal(out, newton_schulz.__wrapped__(g, steps=2))
newton_schulz(g, steps=2)
assert len(compiled) == 1  # compiled once
compat.defer_muon_compilation()  # already imported: nothing happens
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_relink_zero_moments_resets_the_flag_and_relinks():
    calls = []

    class Zero:
        _hp_optimizer_states_linked = True

        def _lazy_init_hp_params_optimizer_state(self):
            calls.append(self._hp_optimizer_states_linked)
            self._hp_optimizer_states_linked = True

    compat.relink_zero_moments(Zero())
    assert calls == [False]  # DeepSpeed's lazy init only links when the flag is down
    with pytest.raises(RuntimeError, match="_lazy_init_hp_params_optimizer_state"):
        compat.relink_zero_moments(SimpleNamespace(_hp_optimizer_states_linked=True))


def _zero3_spans(rank: int, world: int) -> None:
    import torch.distributed as dist

    # 10 elements over 3 ranks: partitions of 4 (padded), the last holding 2 real ones
    param = SimpleNamespace(ds_tensor=torch.zeros(4), ds_numel=10, ds_process_group=dist.group.WORLD)
    assert compat.zero3_span(param) == [(0, 4), (4, 8), (8, 10)][rank]
    param = SimpleNamespace(ds_tensor=torch.zeros(1), ds_numel=2, ds_process_group=dist.group.WORLD)
    assert compat.zero3_span(param) == [(0, 1), (1, 2), (2, 2)][rank]  # a partition of padding only


def test_zero3_span_is_the_rank_s_range_without_padding():
    from parallel.spawn import run_ranks

    run_ranks(_zero3_spans, 3)


def test_hp_fragment_reads_the_mapping():
    flat = torch.arange(10.0)
    mapping = SimpleNamespace(
        lp_fragment_address=SimpleNamespace(start=3, numel=4),
        get_hp_fragment=lambda key=None: flat.narrow(0, 2, 4) if key is None else None,
    )
    start, view = compat.hp_fragment(SimpleNamespace(_hp_mapping=mapping))
    assert start == 3 and view.data_ptr() == flat[2:].data_ptr()  # a view into the partition: writes land there
    assert compat.hp_fragment(SimpleNamespace(_hp_mapping=None)) is None  # none of it on this rank
    with pytest.raises(RuntimeError, match="hp_fragment"):
        compat.hp_fragment(SimpleNamespace())


def test_the_tied_weight_override_targets_an_existing_method():
    from deepspeed.pipe import PipelineModule

    from trainer.parallel.pipeline import GPTPipe

    compat.check_tied_weight_sync()
    assert "_synchronize_tied_weights" in vars(PipelineModule) and "_synchronize_tied_weights" in vars(GPTPipe)


def _bounded_collectives_match(rank: int, world: int) -> None:
    import deepspeed.comm as ds_dist
    import deepspeed.comm.comm as ds_comm

    from tests.parallel.spawn import start_deepspeed

    start_deepspeed(rank, world)  # without the CPU shared-memory op (its build takes a minute)
    backend = ds_comm.cdb
    # Integer values: every sum is exact, so pieces and whole calls must agree bit for bit.
    per_rank = 23  # not a multiple of the piece size: the last piece is short
    mine = torch.arange(per_rank, dtype=torch.float32) + 100 * rank
    full = torch.arange(world * per_rank, dtype=torch.float32) * (rank + 1)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        gathered, scattered = torch.empty(world * per_rank), torch.empty(per_rank)
        backend.all_gather_into_tensor(output_tensor=gathered, input_tensor=mine, async_op=True).wait()
        backend.reduce_scatter_tensor(output_tensor=scattered, input_tensor=full, op=ds_dist.ReduceOp.SUM)
        return gathered, scattered

    whole = both()
    restore = compat.bound_gloo_collectives(max_elements=2 * world)  # pieces of 2 elements per rank
    assert "all_gather_into_tensor" in vars(backend) and "reduce_scatter_tensor" in vars(backend)
    pieces = both()
    restore()
    assert "all_gather_into_tensor" not in vars(backend) and "reduce_scatter_tensor" not in vars(backend)
    for got, want in zip(pieces, whole):
        assert torch.equal(got, want)
    assert torch.equal(whole[0].view(world, per_rank)[1], torch.arange(per_rank) + 100.0)
    assert torch.equal(whole[1], (torch.arange(per_rank) + rank * per_rank) * sum(range(1, world + 1)))


def test_bounded_gloo_collectives_give_the_whole_calls_results_and_restore():
    from tests.parallel.spawn import run_ranks

    run_ranks(_bounded_collectives_match, 3)


def _zero3_steps(share: bool) -> tuple[list[torch.Tensor], object]:
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    config = {
        "train_batch_size": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if share:
        assert compat.share_zero3_fp32_partitions(engine.optimizer) == sum(p.ds_numel for p in model.parameters())
    data = torch.randn(2, 8)
    for _ in range(2):
        engine.backward(engine(data).square().mean())
        engine.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return [p.detach().clone() for p in model.parameters()], engine.optimizer


def _zero3_shared_partitions_train_the_same(rank: int, world: int) -> None:
    from tests.parallel.spawn import start_deepspeed

    start_deepspeed(rank, world)
    copied, _ = _zero3_steps(share=False)
    shared, zero = _zero3_steps(share=True)
    for fp32_flat, model_flat in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat):
        assert fp32_flat.data_ptr() == model_flat.data_ptr()  # one copy of the weights, stepped in place
    for got, want in zip(shared, copied):
        assert torch.equal(got, want)
    assert compat.share_zero3_fp32_partitions(zero) == 0  # already shared: nothing more to free


def test_zero3_fp32_partitions_shared_with_the_model_train_bit_for_bit_the_same():
    from tests.parallel.spawn import run_ranks

    run_ranks(_zero3_shared_partitions_train_the_same, 1)


def _zero3_parameters_decay_like_dense_ones(rank: int, world: int) -> None:
    from tests.parallel.spawn import start_deepspeed
    from trainer.model import GPT, ModelShape
    from trainer.runtime.engine import param_groups

    deepspeed = start_deepspeed(rank, world)
    shape = ModelShape(2, 32, 4, 16, 64, n_kv_head=2, mlp="swiglu", norm="rmsnorm", position="rope", bias=False)
    dense = GPT(shape, seed=0)
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
        partitioned = GPT(shape, seed=None)
    assert all(p.dim() == 1 for p in partitioned.parameters())  # emptied by the partitioning
    names = {id(p): name for name, p in partitioned.named_parameters()}
    dense_names = {id(p): name for name, p in dense.named_parameters()}
    for got, want in zip(param_groups(partitioned, 0.1), param_groups(dense, 0.1)):
        assert [names[id(p)] for p in got["params"]] == [dense_names[id(p)] for p in want["params"]]
        assert got["weight_decay"] == want["weight_decay"]


def test_zero3_partitioned_matrices_are_weight_decayed_like_the_dense_model():
    from tests.parallel.spawn import run_ranks

    run_ranks(_zero3_parameters_decay_like_dense_ones, 1)


def _one_replica_steps(skip: bool) -> tuple[list[torch.Tensor], int]:
    """Two bf16 ZeRO-0 steps of 2 micro-batches on one rank: the parameters, and the all-reduces of more than one
    element they took (the overflow check all-reduces a flag)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if skip:
        assert compat.skip_single_replica_reduction(engine)
    assert engine.enable_backward_allreduce is not skip
    calls, all_reduce = [], torch.distributed.all_reduce

    def counted(*args, **kwargs):
        calls.append(kwargs["tensor"].numel() if "tensor" in kwargs else args[0].numel())
        return all_reduce(*args, **kwargs)

    torch.distributed.all_reduce = counted
    try:
        for _ in range(4):
            engine.backward(engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().square().mean())
            engine.step()
    finally:
        torch.distributed.all_reduce = all_reduce
    return [p.detach().clone() for p in model.parameters()], sum(n > 1 for n in calls)


def _one_replica_skips_its_reduction(rank: int, world: int) -> None:
    from tests.parallel.spawn import start_deepspeed

    start_deepspeed(rank, world)
    reduced, calls = _one_replica_steps(skip=False)
    skipped, none = _one_replica_steps(skip=True)
    assert calls >= 2 and none == 0  # DeepSpeed's reduction over a group of one, at each of the 2 boundaries
    for got, want in zip(skipped, reduced):
        assert torch.equal(got, want)


def test_one_replica_without_zero_skips_the_gradient_all_reduce_and_trains_bit_for_bit_the_same():
    from tests.parallel.spawn import run_ranks

    run_ranks(_one_replica_skips_its_reduction, 1)


@pytest.mark.parametrize("dp,zero", [(2, 0), (1, 1), (4, 2)])
def test_replicas_or_zero_keep_the_gradient_all_reduce(dp, zero):
    engine = SimpleNamespace(dp_world_size=dp, zero_optimization_stage=lambda: zero, enable_backward_allreduce=True)
    assert compat.skip_single_replica_reduction(engine) is False and engine.enable_backward_allreduce


def _wrapper_steps(precision: str, foreach: bool) -> tuple[list[torch.Tensor], list[float], list[float]]:
    """Five steps of a small model in ``precision`` at ZeRO-0 with a clipping norm that bites, the third with NaN
    gradients: the fp32 masters, the gradient norms and the final loss scale, and the scale of each step's
    gradients, with DeepSpeed's own step or ``foreach_fp16_step``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    config = {
        "train_batch_size": 2,
        precision: {"enabled": True, **({"initial_scale_power": 8} if precision == "fp16" else {})},
        "gradient_clipping": 0.05,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
    }
    if precision == "fp16":
        compat.allow_cpu_fp16()
        compat.scale_zero0_fp16_loss()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    restore = compat.foreach_fp16_step(engine.optimizer) if foreach else None
    norms, scales, dtype = [], [], next(model.parameters()).dtype
    for i in range(5):
        loss = engine(torch.randn(2, 8, dtype=dtype)).float().square().mean()
        engine.backward(loss * float("nan") if i == 2 else loss)  # step 3: every gradient NaN
        scales.append(engine.optimizer.loss_scale)
        engine.step()
        norms.append(engine.optimizer._global_grad_norm)
    assert engine.skipped_steps == 1 and compat.skips_nonfinite(engine.optimizer) is foreach
    if restore is not None:
        restore()
        assert "step" not in vars(engine.optimizer)
    masters = [m.detach().clone() for group in engine.optimizer.fp32_groups for m in group]
    return masters, [*norms, engine.optimizer.loss_scale], scales


def _foreach_step_matches_deepspeeds(rank: int, world: int) -> None:
    from tests.parallel.spawn import start_deepspeed

    start_deepspeed(rank, world)
    for precision in ("bf16", "fp16"):
        want, want_norms, scales = _wrapper_steps(precision, foreach=False)
        got, got_norms, _ = _wrapper_steps(precision, foreach=True)
        assert min(want_norms[:2] + want_norms[3:5]) > 0.05 and want_norms[2] == float("inf")  # clipped; skipped
        assert want_norms[-1] == (2**7 if precision == "fp16" else 1.0)  # the skip halved fp16's scale
        assert scales == ([2**8, 2**8, 2**8, 2**7, 2**7] if precision == "fp16" else [1.0] * 5)
        # DeepSpeed's unfused wrapper keeps the scaled norm; ours the gradients' own (fp32 norms, summed in
        # another order)
        unscaled = [norm / scale for norm, scale in zip(want_norms, scales)] + want_norms[-1:]
        assert got_norms == pytest.approx(unscaled, rel=1e-6), precision
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_foreach_step_updates_as_deepspeeds_own_step_in_bf16_and_fp16():
    from tests.parallel.spawn import run_ranks

    run_ranks(_foreach_step_matches_deepspeeds, 1)
    assert compat.foreach_fp16_step(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is None

"""Every place the trainer changes DeepSpeed or torch internals, each checked against the version it
was written for.

The trainer relies on a few private attributes, replaced methods and module globals of DeepSpeed
(and one of torch). They live here, and nowhere else, so that an upgrade has one file to re-check:

    patch                        target                                              undo
    skip_shm_comm_op             deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]   restore callable
    defer_muon_compilation       deepspeed.runtime.compiler.compile, while Muon imports   nothing to undo
    set_default_pg_timeout       torch c10d default_pg_timeout, default_pg_nccl_timeout   restore callable
    replace_fp32_clipping        engine.clip_fp32_gradients, engine._global_grad_norm      restore callable
    wrap_pipe_instructions       PipelineEngine._INSTRUCTION_MAP (shadowed per engine)     restore callable
    skip_optimizer_step_when     optimizer.step, optimizer.overflow (read by the engine)   restore callable
    relink_zero_moments          ZeRO-1/2 _hp_optimizer_states_linked + its lazy init      nothing to undo
    share_zero3_fp32_partitions  ZeRO-3 fp32_partitioned_groups_flat[i].data               nothing to undo
    refresh_zero3_model_partitions  ZeRO-3 fp16_partitioned_groups_flat (written)          nothing to undo
    zero3_span, hp_fragment      ZeRO-3 ds_tensor, ds_process_group; _hp_mapping (read)   nothing to undo
    update_lp_params             ZeRO-1/2's and BF16_Optimizer's update_lp_params (called) nothing to undo
    name_comm_logs               deepspeed.comm.comm.get_debug_log_name                    restore callable
    bound_gloo_collectives       the comm backend's all_gather_into_tensor, reduce_scatter_tensor   restore callable
    check_tied_weight_sync       PipelineModule._synchronize_tied_weights (overridden)     not a patch
    allow_cpu_fp16               the CPU accelerator's is_fp16_supported, supported_dtypes  restore callable
    scale_zero0_fp16_loss        DeepSpeedEngine.backward (the class's, for the run)        restore callable
    undo_fp16_optimizer_warmup   FP16_(Unfused)Optimizer's Adam state and fp32 masters      nothing to undo
    foreach_fp16_step            FP16_UnfusedOptimizer.step (shadowed per optimizer)       restore callable

Each patch first calls ``check_version``: where an attribute it changes is missing it raises a
RuntimeError naming the patch and both versions; where the attributes are there but the installed
major.minor differs from the one the patch was written and tested for (``DEEPSPEED_VERSION``,
``TORCH_VERSION``), it warns once per patch and goes on.

Restore callables put back exactly what was there before (an attribute the instance did not have is
removed again, so the class's shows through), at most once, and refuse -- RuntimeError -- while a later
patch of the same attribute is still in place: undo patches in the reverse order.

``GPTPipe._synchronize_tied_weights`` (trainer.parallel.pipeline) stays a subclass override there:
``PipelineModule.__init__`` calls the method, so only an override is in place for that first call,
and it changes our own modules only -- nothing global, nothing to undo. A renamed DeepSpeed method
would make the override dead code without an error, so ``GPTPipe.__init__`` calls
``check_tied_weight_sync`` from here.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

DEEPSPEED_VERSION = "0.19.8"  # the pinned DeepSpeed every patch here was written and tested for
TORCH_VERSION = "2.13.0"  # the pinned torch, for set_default_pg_timeout
_TESTED = {"deepspeed": DEEPSPEED_VERSION, "torch": TORCH_VERSION}
_warned: set[str] = set()
_ABSENT = object()

Restore = Callable[[], None]


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def check_version(patch: str, owner: Any, *attrs: str, library: str = "deepspeed") -> None:
    """Raise if ``owner`` (an object, or a dict for keys) lacks one of ``attrs``; warn once per patch
    when the installed ``library``'s major.minor differs from the tested one."""
    installed = importlib.import_module(library).__version__
    tested = _TESTED[library]
    for attr in attrs:
        if not (attr in owner if isinstance(owner, dict) else hasattr(owner, attr)):
            owner_name = getattr(owner, "__name__", type(owner).__name__)
            where = "key" if isinstance(owner, dict) else f"attribute of {owner_name}"
            raise RuntimeError(
                f"compat patch {patch!r}: {library} {installed} has no {attr!r} ({where}); the patch was "
                f"written for {library} {tested}. Install {library}=={tested} or port trainer/runtime/compat.py."
            )
    if _major_minor(installed) != _major_minor(tested) and patch not in _warned:
        _warned.add(patch)
        warnings.warn(
            f"compat patch {patch!r} was written and tested for {library} {tested}, running on {installed}: "
            "check it still applies (trainer/runtime/compat.py)",
            RuntimeWarning,
            stacklevel=3,
        )


def _swap(namespace: dict, key: str, value: Any, patch: str, lifo: bool = True) -> Restore:
    """namespace[key] = value (an object's ``vars()``, a module's, or a plain dict); the returned
    callable puts back the previous value or removes the key. ``lifo``: refuse while another value of
    the key is in place (a later patch of it not yet undone)."""
    previous = namespace.get(key, _ABSENT)
    namespace[key] = value
    done = False

    def restore() -> None:
        nonlocal done
        if done:
            return
        if lifo and namespace.get(key, _ABSENT) is not value:
            raise RuntimeError(f"compat patch {patch!r}: {key} was patched again since; undo that patch first")
        if previous is _ABSENT:
            namespace.pop(key, None)
        else:
            namespace[key] = previous
        done = True

    return restore


def _chain(*restores: Restore) -> Restore:
    """One callable running ``restores`` in order (list the last patch first)."""

    def restore() -> None:
        for undo in restores:
            undo()

    return restore


def skip_shm_comm_op() -> Restore:
    """Mark DeepSpeed's CPU shared-memory all-reduce op as unavailable.

    What: ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False``, which
    ``deepspeed.comm.torch.build_shm_op`` reads when the backend starts.
    Why: on CPU DeepSpeed JIT-compiles that op at start-up (a minute per fresh environment) and each
    rank creates a 66 MB /dev/shm buffer that is never unlinked, so repeated runs fill RAM. Only
    ``inference_all_reduce`` uses it; training collectives go through torch.distributed either way.
    Undo: the returned callable puts the flag back; a backend started meanwhile keeps running without
    the op (call this before ``deepspeed.init_distributed``).
    """
    import deepspeed.ops

    check_version("skip_shm_comm_op", deepspeed.ops, "__compatible_ops__")
    ops = deepspeed.ops.__compatible_ops__  # built lazily by the module's __getattr__
    check_version("skip_shm_comm_op", ops, "deepspeed_shm_comm")
    return _swap(ops, "deepspeed_shm_comm", False, "skip_shm_comm_op")


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def defer_muon_compilation() -> None:
    """Import DeepSpeed's Muon optimizer module with its ``torch.compile`` decorators deferred to each
    function's first call.

    What: while the module is imported, ``deepspeed.runtime.compiler.compile()`` (which returns
    ``torch.compile``) returns a decorator that compiles on the first call instead; then it is put back.
    Does nothing where the module is already imported.
    Why: DeepSpeed 0.19.8's ZeRO imports that module on every rank (stage 1/2 at the first gradient
    reduction, stage 3 at start-up, the engine's optimizer check) and ``torch.compile`` applied at import
    loads inductor: 1.4 s of each rank's start-up on this project's CPUs, for an optimizer the trainer never
    builds. A Muon function compiles as before, at its first call.
    Undo: nothing to undo (the module's functions keep their deferred compilation).
    """
    import sys

    if MUON_MODULE in sys.modules:
        return
    import torch
    from deepspeed.runtime import compiler

    check_version("defer_muon_compilation", compiler, "compile")

    def compile_on_first_call() -> Callable[[Callable], Callable]:
        def decorate(fn: Callable) -> Callable:
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                compiled = compiled or torch.compile(fn)
                return compiled(*args, **kwargs)

            return call

        return decorate

    restore = _swap(vars(compiler), "compile", compile_on_first_call, "defer_muon_compilation")
    try:
        importlib.import_module(MUON_MODULE)
    finally:
        restore()


class _Done:
    """The handle of a collective that already ran (what DeepSpeed waits on after an async call)."""

    def wait(self, *_args, **_kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def bound_gloo_collectives(max_elements: int) -> Restore:
    """Run DeepSpeed's all-gathers and reduce-scatters over gloo in pieces of at most ``max_elements``.

    What: wraps ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` of DeepSpeed's communication
    backend (``deepspeed.comm.comm.cdb``, a ``TorchBackend``), which every ZeRO gather and gradient
    reduce-scatter goes through. A call on a gloo group with a larger gathered output / scattered input
    runs as consecutive calls on matching slices of every rank's part (the same elements meet the same
    partners, so the result is the same; only gloo's internal summation blocks may differ). Calls on
    other backends pass straight through; an async call runs synchronously and returns a done handle.
    Why: gloo copies the whole tensor into temporaries (measured: about once the gathered output, once
    the scattered input), and ZeRO-3 gathers and reduce-scatters a parameter larger than its buckets in
    one call: gpt2-large's 64M-element embedding then costs each rank ~250 MB at once, twice per step.
    Undo: the returned callable removes the wrappers (call after ``deepspeed.init_distributed``).
    """
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    backend = ds_comm.cdb
    check_version("bound_gloo_collectives", backend, "all_gather_into_tensor", "reduce_scatter_tensor")
    gather, scatter = backend.all_gather_into_tensor, backend.reduce_scatter_tensor

    def on_gloo(group, elements: int) -> bool:
        return elements > max_elements and dist.get_backend(group) == "gloo"

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if not on_gloo(group, output_tensor.numel()):
            return gather(output_tensor, input_tensor, group=group, async_op=async_op)
        world, mine = dist.get_world_size(group), input_tensor.view(-1)
        rows = output_tensor.view(world, -1)
        for lo, hi in _pieces(mine.numel(), max(1, max_elements // world)):
            piece = output_tensor.new_empty(world * (hi - lo))
            gather(piece, mine[lo:hi], group=group, async_op=False)
            rows[:, lo:hi].copy_(piece.view(world, -1))
        return _Done()

    def reduce_scatter_tensor(output_tensor, input_tensor, op=None, group=None, async_op=False):
        kwargs = {} if op is None else {"op": op}
        if not on_gloo(group, input_tensor.numel()):
            return scatter(output_tensor, input_tensor, group=group, async_op=async_op, **kwargs)
        world, mine = dist.get_world_size(group), output_tensor.view(-1)
        rows = input_tensor.view(world, -1)
        for lo, hi in _pieces(mine.numel(), max(1, max_elements // world)):
            scatter(mine[lo:hi], rows[:, lo:hi].contiguous().view(-1), group=group, **kwargs)
        return _Done()

    return _chain(
        _swap(vars(backend), "reduce_scatter_tensor", reduce_scatter_tensor, "bound_gloo_collectives"),
        _swap(vars(backend), "all_gather_into_tensor", all_gather_into_tensor, "bound_gloo_collectives"),
    )


def _pieces(n: int, size: int) -> Iterator[tuple[int, int]]:
    return ((lo, min(n, lo + size)) for lo in range(0, n, size))


def set_default_pg_timeout(timeout: timedelta) -> Restore:
    """Make ``timeout`` torch's default for every process group created from now on.

    What: sets ``torch.distributed.distributed_c10d``'s module globals ``default_pg_timeout`` and
    ``default_pg_nccl_timeout``, which ``new_group`` reads when given no timeout.
    Why: the timeout passed to ``init_distributed`` covers the default group only; every later
    ``new_group`` (the mesh's, DeepSpeed's own) takes torch's module default (30 min gloo, 10 min nccl),
    so a hung peer would stall those collectives that long.
    Undo: process-wide; the returned callable puts the old defaults back for groups created after it,
    groups created before keep the timeout. The trainer keeps it for the whole run.
    """
    import torch.distributed.distributed_c10d as c10d

    names = ("default_pg_timeout", "default_pg_nccl_timeout")
    check_version("set_default_pg_timeout", c10d, *names, library="torch")
    undo = [_swap(vars(c10d), name, timeout, "set_default_pg_timeout") for name in names]
    return _chain(*reversed(undo))


def replace_fp32_clipping(engine, clip: Callable[[], Any]) -> Restore:
    """Clip an engine's fp32 gradients with ``clip`` and report the norm it returns.

    What: shadows ``DeepSpeedEngine.clip_fp32_gradients`` on this engine (called in the optimizer step
    when ``gradient_clipping`` > 0 without ZeRO, fp16 or bf16) by a function that runs ``clip()`` and
    stores its return value in ``engine._global_grad_norm``, what ``get_global_grad_norm()`` returns.
    Why: DeepSpeed's version (``runtime.utils.clip_grad_norm_``) takes replicated parameters from
    model-parallel rank 0 only, so on a pipeline it drops later stages' gradients and clips by the wrong
    norm, and it keeps no norm (see trainer.parallel.pipeline.install_pipeline_clipping).
    Undo: the returned callable removes the shadow (the class's method again); the last norm stays.
    """
    check_version("replace_fp32_clipping", engine, "clip_fp32_gradients", "_global_grad_norm")

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = clip()

    return _swap(vars(engine), "clip_fp32_gradients", clip_fp32_gradients, "replace_fp32_clipping")


def wrap_pipe_instructions(engine, wrap: Callable[[str, Callable], Callable]) -> Restore:
    """Replace each pipeline instruction handler ``h`` of ``engine`` by ``wrap(kind name, h)``.

    What: ``PipelineEngine._INSTRUCTION_MAP`` (a class attribute: instruction type -> plain function
    the engine binds to itself when executing the schedule) is shadowed on this engine instance by a
    map of the wrapped handlers; it wraps whatever map the engine sees, so wrappers stack.
    Why: DeepSpeed has no hook around its pipeline instructions; the bubble meter and the training
    loop's phase clock time them this way.
    Undo: the returned callable puts back the map the engine had (the class's where it had none of its
    own). Undo stacked wrappers in reverse order; the other order raises.
    """
    check_version("wrap_pipe_instructions", engine, "_INSTRUCTION_MAP")
    wrapped = {kind: wrap(kind.__name__, handler) for kind, handler in engine._INSTRUCTION_MAP.items()}
    return _swap(vars(engine), "_INSTRUCTION_MAP", wrapped, "wrap_pipe_instructions")


def skip_optimizer_step_when(engine, should_skip: Callable[[], bool]) -> Restore:
    """Let ``should_skip()`` veto each optimizer step of ``engine``, which then counts it as skipped.

    What: shadows ``engine.optimizer.step`` by one that asks ``should_skip()`` first and, on True,
    drops the gradients (``zero_grad(set_to_none=True)``) instead of stepping; it sets
    ``optimizer.overflow`` to the answer, which ``DeepSpeedEngine._take_model_step`` reads after the
    step: True adds one to ``engine.skipped_steps`` and holds the learning-rate schedule.
    Why: at ZeRO-0 without fp16, DeepSpeed applies whatever gradients it has, NaN included; fp16 and
    ZeRO-1/2 skip through the same ``overflow`` flag.
    Undo: the returned callable puts back the optimizer's step and removes ``overflow`` (a stale True
    would mark every later step skipped).
    """
    check_version("skip_optimizer_step_when", engine, "_take_model_step", "skipped_steps", "optimizer")
    optimizer = engine.optimizer
    apply_update = optimizer.step

    def step(closure=None):
        optimizer.overflow = bool(should_skip())
        if optimizer.overflow:
            optimizer.zero_grad(set_to_none=True)
            return None
        return apply_update(closure)

    patch = "skip_optimizer_step_when"
    undo_overflow = _swap(vars(optimizer), "overflow", False, patch, lifo=False)  # each step rewrites it
    return _chain(_swap(vars(optimizer), "step", step, patch), undo_overflow)


def relink_zero_moments(zero) -> None:
    """Point a ZeRO-1/2 optimizer's per-parameter views at its current optimizer state.

    What: sets ``DeepSpeedZeroOptimizer._hp_optimizer_states_linked = False`` and calls
    ``_lazy_init_hp_params_optimizer_state()``, which links each parameter's ``_hp_mapping`` to its slice
    of the flat partition's state and sets the flag again.
    Why: DeepSpeed links those views once, at the first step; state created afterwards (zeroed Adam state
    before loading moments) or missed (after a skipped, non-finite step) is not seen, and
    ``safe_get_full_optimizer_state`` / ``safe_set_full_optimizer_state`` fail with "exp_avg not found".
    Undo: nothing to undo: the call leaves the flag as DeepSpeed's own first step does.
    """
    check_version("relink_zero_moments", zero, "_hp_optimizer_states_linked", "_lazy_init_hp_params_optimizer_state")
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def share_zero3_fp32_partitions(zero) -> int:
    """Let a ZeRO-3 optimizer that already works in fp32 step its parameter partitions in place.

    What: for each sub-group whose "fp32" partition is a separate copy of a partition that is itself
    fp32 and on the same device, points the copy's ``.data`` at the partition (the same tensor object
    stays in the optimizer's parameter groups and state) and frees the copy. Returns the elements freed.
    Why: ``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`` means to skip the copy when the dtypes
    and devices match, but compares ``tensor.device`` with a device *name* (a str, never equal to a
    ``torch.device``), so fp32 training keeps every weight twice: 4 bytes per parameter per rank more
    than ZeRO-3's share (0.77 GB per rank for gpt2-large on 4 ranks). After the step DeepSpeed copies
    the fp32 partition into the model's, which is then a copy onto itself.
    Call right after ``deepspeed.initialize``, before the first step.
    """
    check_version("share_zero3_fp32_partitions", zero, "fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat")
    freed = 0
    for model_flat, fp32_flat in zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat):
        same_kind = model_flat.dtype == fp32_flat.dtype and model_flat.device == fp32_flat.device
        if same_kind and fp32_flat.data_ptr() != model_flat.data_ptr():
            fp32_flat.data = model_flat.data
            freed += model_flat.numel()
    return freed


def zero3_span(param) -> tuple[int, int]:
    """The flat range ``[start, stop)`` of a ZeRO-3 parameter this rank's partition holds (empty where
    the partition is all padding).

    What: reads ``param.ds_tensor`` (the partition, padded to an equal size on every rank), ``ds_numel``
    and ``ds_process_group`` (whose rank orders the partitions: ``_get_param_partition_rank``).
    Why: a checkpoint load writes each rank's partition (``deepspeed.utils.safe_set_local_*``) from only
    the elements it holds, instead of every rank assembling the whole parameter.
    """
    import torch.distributed as dist

    check_version("zero3_span", param, "ds_tensor", "ds_numel", "ds_process_group")
    size = param.ds_tensor.numel()
    start = min(dist.get_rank(group=param.ds_process_group) * size, param.ds_numel)
    return start, min(start + size, param.ds_numel)


def hp_fragment(param, key: str | None = None):
    """``(start, tensor)``: the flat offset in ``param`` and the view of this rank's fp32 master (``key``
    None) or optimizer-state fragment of a ZeRO-1/2 or bf16-pipeline parameter; None where this rank's
    partition holds none of it.

    What: reads ``param._hp_mapping`` (DeepSpeed's ``tensor_fragment``: ``lp_fragment_address`` and
    ``get_hp_fragment``), as ``safe_set_full_fp32_param`` does after taking the whole tensor.
    Why: a checkpoint load writes the fragment from only the elements it holds. Moments need
    ``relink_zero_moments`` after the state is created.
    """
    check_version("hp_fragment", param, "_hp_mapping")
    mapping = param._hp_mapping
    if mapping is None:
        return None
    return mapping.lp_fragment_address.start, mapping.get_hp_fragment(key)


def update_lp_params(optimizer) -> None:
    """Copy a ZeRO-1/2 or bf16-pipeline optimizer's fp32 partitions into the model's weights and all-gather
    them over data parallelism (DeepSpeed's own method, as its universal-checkpoint load calls it): after a
    load wrote only this rank's fragments."""
    check_version("update_lp_params", optimizer, "update_lp_params")
    optimizer.update_lp_params()


def refresh_zero3_model_partitions(zero) -> None:
    """Copy a ZeRO-3 optimizer's fp32 master partitions into the model's (bf16/fp16) partitions.

    What: for every sub-group, the flat fp32 partition is copied into the flat model partition, and each
    parameter's partition is pointed at its piece of it (as DeepSpeed's own step does after updating).
    Why: ``deepspeed.utils.safe_set_full_fp32_param`` writes only the fp32 master under ZeRO-3; the model
    keeps the weights it was built with until the next optimizer step overwrites them, so the first forward
    and backward after loading a checkpoint ran on the initial weights (DeepSpeed's universal-checkpoint load
    does this copy itself). In fp32 with ``share_zero3_fp32_partitions`` the two are one tensor: a no-op.
    Call after writing the masters, before the next forward.
    """
    check_version(
        "refresh_zero3_model_partitions",
        zero,
        "fp16_partitioned_groups_flat",
        "fp16_partitioned_groups",
        "fp32_partitioned_groups_flat",
        "unflatten",
    )
    groups = zip(zero.fp16_partitioned_groups_flat, zero.fp16_partitioned_groups, zero.fp32_partitioned_groups_flat)
    for model_flat, params, fp32_flat in groups:
        if model_flat is None or fp32_flat.data_ptr() == model_flat.data_ptr():
            continue
        model_flat.data.copy_(fp32_flat.data)
        for param, piece in zip(params, zero.unflatten(model_flat, params)):
            param.data = piece.data


def name_comm_logs(name_fn: Callable[[dict, bool], str]) -> Restore:
    """Let ``name_fn`` name the records of DeepSpeed's communication logger.

    What: replaces ``deepspeed.comm.comm.get_debug_log_name``, which ``timed_op`` calls before and
    after every logged collective to name its record.
    Why: the logger keys records by op name alone, but turning bytes into bytes sent needs the size of
    the op's group (trainer.training.ds_comms.DeepSpeedComms appends "@<group size>").
    Undo: the returned callable puts DeepSpeed's function back.
    """
    import deepspeed.comm.comm as ds_comm_impl

    check_version("name_comm_logs", ds_comm_impl, "get_debug_log_name", "comms_logger", "timers")
    return _swap(vars(ds_comm_impl), "get_debug_log_name", name_fn, "name_comm_logs", lifo=False)


def check_tied_weight_sync() -> None:
    """Check the method ``GPTPipe`` overrides still exists in DeepSpeed's ``PipelineModule``.

    What: nothing is changed here; ``GPTPipe._synchronize_tied_weights`` runs DeepSpeed's under ``no_grad``.
    Why: DeepSpeed broadcasts tied parameters in place with autograd on; c10d's broadcast has no autograd
    kernel, so torch warns at every later backward. A renamed method would silently bypass the override.
    Undo: nothing to undo: an override in our own subclass changes no DeepSpeed state.
    """
    from deepspeed.pipe import PipelineModule

    check_version("check_tied_weight_sync", PipelineModule, "_synchronize_tied_weights")


def allow_cpu_fp16() -> Restore:
    """Let DeepSpeed train fp16 on the CPU accelerator.

    What: shadows ``is_fp16_supported`` (True) and ``supported_dtypes`` (+ float16) on the accelerator
    instance ``deepspeed.accelerator.get_accelerator()`` returns, when it is DeepSpeed's ``CPU_Accelerator``.
    Why: that accelerator reports fp16 only where oneDNN has fast fp16 kernels (AVX512-FP16/AMX-FP16), so
    ``DeepSpeedEngine`` refuses ``fp16.enabled`` ("Type fp16 is not supported on your device") and its
    gradient all-reduce asserts on fp16 gradients. torch's CPU kernels and gloo compute fp16 everywhere,
    only slower, so fp16 with loss scaling can be trained and tested on any CPU.
    Undo: the returned callable removes the shadows (the class's methods again).
    """
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    accelerator = get_accelerator()
    check_version("allow_cpu_fp16", accelerator, "is_fp16_supported", "supported_dtypes")
    if not isinstance(accelerator, CPU_Accelerator) or accelerator.is_fp16_supported():
        return lambda: None
    dtypes = [*accelerator.supported_dtypes(), torch.float16]
    return _chain(
        _swap(vars(accelerator), "supported_dtypes", lambda: list(dtypes), "allow_cpu_fp16"),
        _swap(vars(accelerator), "is_fp16_supported", lambda: True, "allow_cpu_fp16"),
    )


def _fp16_wrappers() -> tuple[type, ...]:
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return FP16_Optimizer, FP16_UnfusedOptimizer


def scale_zero0_fp16_loss() -> Restore:
    """Scale the loss by the fp16 loss scale in ``DeepSpeedEngine.backward`` without ZeRO.

    What: wraps the class's ``backward`` (the pipeline engine's last stage calls it through ``super()``): for
    an engine whose optimizer is DeepSpeed's ``FP16_Optimizer`` / ``FP16_UnfusedOptimizer`` with fp16 on, it
    runs backward on ``loss * loss_scale`` and returns what DeepSpeed returns divided by the scale again.
    Why: DeepSpeed 0.19.8 scales the loss only for ZeRO optimizers (and torch autocast), yet those two
    optimizers divide every gradient by the scale in ``step``: fp16 at ZeRO-0 updated with gradients 2^16
    times too small (Adam's eps then dominates; the loss fell at a fraction of fp32's rate) and small
    gradients underflowed unscaled (deepspeedai/DeepSpeed#8393, open). Non-finite gradients still overflow
    the scaled backward, so the optimizer's skip and the scale's halving work as designed.
    Undo: the returned callable puts the class's method back (a no-op when it was already in place).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    check_version("scale_zero0_fp16_loss", DeepSpeedEngine, "backward", "fp16_enabled", "zero_optimization")
    if getattr(DeepSpeedEngine.backward, "scales_zero0_fp16_loss", False):  # in place: once per process
        return lambda: None
    wrappers, unscaled_backward = _fp16_wrappers(), DeepSpeedEngine.backward

    def backward(self, loss, *args, **kwargs):
        optimizer = self.optimizer
        if not (self.fp16_enabled() and not self.zero_optimization() and isinstance(optimizer, wrappers)):
            return unscaled_backward(self, loss, *args, **kwargs)
        scale = optimizer.loss_scale
        return unscaled_backward(self, loss.float() * scale, *args, **kwargs) / scale

    backward.scales_zero0_fp16_loss = True
    DeepSpeedEngine.backward = backward  # a class's namespace is read-only to _swap

    def restore() -> None:
        if DeepSpeedEngine.__dict__.get("backward") is backward:
            DeepSpeedEngine.backward = unscaled_backward

    return restore


def undo_fp16_optimizer_warmup(optimizer) -> bool:
    """Give DeepSpeed's fp16/bf16 ZeRO-0 optimizer wrapper the state of an optimizer that never stepped.

    What: for ``FP16_Optimizer`` / ``FP16_UnfusedOptimizer`` (bf16 or fp16 without ZeRO), clears the inner
    optimizer's state and copies the 16-bit weights back into the fp32 masters (cloned from them at set-up).
    Returns whether it did (False for any other optimizer).
    Why: both wrappers create Adam's state by stepping once with zero gradients at set-up. That counts as
    Adam's first step -- the real first step then uses step-2 bias correction, 0.73x fp32's update, and
    every early step is smaller -- and AdamW's decoupled decay shrinks the masters once at the full
    learning rate (DeepSpeed removed that step from ZeRO in deepspeedai/DeepSpeed#5104, not here). torch's
    Adam creates its state lazily at the real first step.
    Undo: nothing to undo: the optimizer is as it would be without that step.
    """
    import torch

    if not isinstance(optimizer, _fp16_wrappers()):
        return False
    check_version("undo_fp16_optimizer_warmup", optimizer, "optimizer", "fp16_groups")
    with torch.no_grad():
        if hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer: flat buffers per group
            for master, weights in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups_flat):
                master.copy_(weights)
        else:
            for masters, params in zip(optimizer.fp32_groups, optimizer.fp16_groups):
                for master, param in zip(masters, params):
                    master.copy_(param)
    optimizer.optimizer.state.clear()
    return True


def foreach_fp16_step(optimizer) -> Restore | None:
    """Step DeepSpeed's fp16/bf16 ZeRO-0 optimizer wrapper with a few multi-tensor kernels, its norm counting each
    gradient once.

    What: shadows ``step`` of an ``FP16_UnfusedOptimizer`` by one that does what DeepSpeed 0.19.8's does -- skip on
    a non-finite gradient, the clipping norm of the 16-bit gradients (summed over the model-parallel group), fp32
    copies of the gradients, unscale and clip, the inner optimizer's step, the fp32 masters back into the 16-bit
    weights -- with ``torch._foreach_*`` calls and one host sync, reading the ``tensor_model_parallel`` /
    ``ds_pipe_replicated`` flags off the parameters. The overflow test is the per-tensor norms' (a tensor with an
    inf or NaN has a non-finite norm), reduced over every rank, so any rank's bad gradient skips the step
    everywhere (``skips_nonfinite``: ``trainer.training.guard`` then adds no check of its own). Returns the undo,
    or None for any other optimizer.
    Why: DeepSpeed walks the ~290 tensors of gpt3-1.3b five times a step in Python, one small kernel per tensor
    each time, with three host syncs (two for the overflow flag, one for the norm), and its norm reads those flags
    off the gradients, which carry none (every tp rank but the first dropped its shards of the split weights --
    tp2, gpt-tiny: norm 1.75 instead of 2.04 -- and a pipeline's tied embedding counted twice). Norms are
    per-tensor fp32 as DeepSpeed's; only their summation order differs. The norm it keeps (``_global_grad_norm``,
    what the engine reports and the trainer logs) is the gradients' own, the loss scale divided out, as DeepSpeed's
    fused ``FP16_Optimizer`` keeps it; the unfused one kept the scaled norm (fp16: 2^16 times too large).
    Undo: the returned callable puts the optimizer's step back.
    """
    import torch
    from deepspeed import comm
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

    from trainer.parallel.grad_norm import counted_once

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return None
    check_version("foreach_fp16_step", optimizer, "step", "fp16_groups", "fp32_groups", "mpu", "clip_grad")
    check_version("foreach_fp16_step", optimizer, "_skip_invalid_grad_norm", "_update_scale", "unscale_and_clip_grads")
    check_version("foreach_fp16_step", optimizer, "loss_scale")
    first_tp_rank = bwc_tensor_model_parallel_rank(mpu=optimizer.mpu) == 0
    model_parallel = optimizer.mpu.get_model_parallel_group() if optimizer.mpu is not None else None

    def all_reduce(tensor, op, group=None) -> None:
        if comm.get_world_size(group=group) > 1:
            comm.all_reduce(tensor, op=op, group=group)

    def norms(group) -> tuple[torch.Tensor, torch.Tensor]:
        """The squared norm of the group's counted gradients, and the sum of every gradient's norm (not finite
        if any gradient is not)."""
        with_grad = [p for p in group if p.grad is not None]
        if not with_grad:
            zero = torch.zeros((), dtype=torch.float32, device=group[0].device)
            return zero, zero
        each = torch._foreach_norm([p.grad for p in with_grad], 2, dtype=torch.float32)
        kept = [norm for norm, p in zip(each, with_grad) if counted_once(p, first_tp_rank)]
        kept = kept or [torch.zeros_like(each[0])]
        return torch.stack(kept).square().sum(), torch.stack(each).sum()

    def step(closure=None):
        squares, sums = zip(*(norms(group) for group in optimizer.fp16_groups))
        squares = torch.stack(squares)
        bad = (~torch.isfinite(torch.stack(sums).sum())).float().view(1)
        all_reduce(squares, comm.ReduceOp.SUM, model_parallel)
        all_reduce(bad, comm.ReduceOp.MAX)
        *group_squares, overflow = torch.cat([squares, bad]).tolist()  # the step's one host sync
        if overflow or not all(math.isfinite(s) for s in group_squares):
            return optimizer._skip_invalid_grad_norm()  # sets optimizer.overflow, which the engine counts
        optimizer.overflow = False
        scaled, scale = math.sqrt(sum(group_squares)), optimizer.loss_scale  # the scale these gradients carry
        masters, grads, halves, fp16_grads = [], [], [], []
        for fp32_group, fp16_group in zip(optimizer.fp32_groups, optimizer.fp16_groups):
            for master, param in zip(fp32_group, fp16_group):
                master.grad = torch.zeros_like(master) if param.grad is None else torch.empty_like(master)
                if param.grad is not None:
                    grads.append(master.grad)
                    fp16_grads.append(param.grad)
                masters.append(master)
                halves.append(param)
        torch._foreach_copy_(grads, fp16_grads)
        optimizer._update_scale(False)
        combined_scale = optimizer.unscale_and_clip_grads(scaled, apply_scale=False)
        optimizer._global_grad_norm = scaled / scale
        if combined_scale != 1.0:  # bf16 without clipping: the multiply by 1 changes nothing
            torch._foreach_mul_(grads, 1.0 / combined_scale)
        optimizer.optimizer.step()
        for master in masters:
            master.grad = None
        with torch.no_grad():
            torch._foreach_copy_(halves, masters)
        return optimizer.overflow

    step.skips_nonfinite = True
    return _swap(vars(optimizer), "step", step, "foreach_fp16_step")


def skips_nonfinite(optimizer) -> bool:
    """Whether ``optimizer``'s step is ``foreach_fp16_step``'s, which skips a step with a non-finite gradient on
    any rank."""
    return getattr(vars(optimizer).get("step"), "skips_nonfinite", False)


def skip_single_replica_reduction(engine) -> bool:
    """Let an engine with one data-parallel replica and no ZeRO skip its gradient all-reduce.

    What: sets the engine's ``enable_backward_allreduce`` (a PipelineEngine's ``pipeline_enable_backward_allreduce``)
    to False when its data-parallel group has one rank and ZeRO is off. Returns whether it did.
    Why: DeepSpeed 0.19.8 reduces at every accumulation boundary whatever the group's size: it flattens every
    gradient into a buffer, all-reduces it over a group of one, divides it by 1 and copies it back, two copies of
    every gradient a step that change nothing (one process, 8 layers x 512 hidden in bf16 on CPU: 12 ms of ~470).
    Tensor-parallel and tied-embedding gradients are reduced elsewhere and are not affected.
    """
    if engine.dp_world_size != 1 or engine.zero_optimization_stage() != 0:
        return False
    check_version("skip_single_replica_reduction", engine, "enable_backward_allreduce")
    engine.enable_backward_allreduce = False
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = False
    return True

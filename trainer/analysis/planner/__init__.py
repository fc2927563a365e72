"""Layout planner: predict per-GPU memory and step time of every parallel layout of a model on a
cluster, and rank those that fit (``python -m trainer.plan``; docs/planner.md).

One module per job: ``config`` (the schema Hydra composes), ``cluster`` (hardware numbers, SI units),
``localbench`` (measures this machine for ``cluster=cpu-local``), ``shape`` (the model's sizes),
``layouts`` (enumeration and what the trainer can run), ``memory`` and ``costmodel`` (the
predictions), ``predict`` (both together, ranked), ``report`` (terminal and JSON), ``calibrate``
(fit efficiencies to a ``trainer.compare`` report) and ``published`` (Megatron-LM's measured runs).
"""

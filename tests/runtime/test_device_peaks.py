"""Data-sheet peaks by device name (what MFU divides by on a GPU), and the planner's clusters stating the same."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT
from trainer.runtime import hardware
from trainer.runtime.hardware import GPU_PEAK, gpu_peaks

# torch.cuda.get_device_name of each part -> (bf16, fp32) dense TFLOP/s from NVIDIA's data sheets.
DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": (989, 67),  # SXM5
    "NVIDIA H100 PCIe": (756, 51),
    "NVIDIA H100 NVL": (835, 60),
    "NVIDIA H200": (989, 67),
    "NVIDIA H200 NVL": (835, 60),
    "NVIDIA A100-SXM4-80GB": (312, 19.5),
    "NVIDIA A100-SXM4-40GB": (312, 19.5),
    "NVIDIA A100-PCIE-40GB": (312, 19.5),
    "NVIDIA A100 80GB PCIe": (312, 19.5),
}


@pytest.mark.parametrize("name", sorted(DEVICE_NAMES))
def test_peaks_follow_the_device_name(name):
    bf16, fp32 = DEVICE_NAMES[name]
    peaks = gpu_peaks(name)
    assert (peaks["bf16"], peaks["fp16"], peaks["fp32"]) == (bf16 * 1e12, bf16 * 1e12, fp32 * 1e12)


def test_an_unknown_gpu_has_no_table_entry():
    assert gpu_peaks("NVIDIA GeForce RTX 4090") is None  # measured at start instead (hardware.measured_on_gpu)


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "cluster").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_planners_clusters_state_the_same_peaks(path):
    """One set of numbers: a cluster file's peaks are the table's for its GPU (inherited values included)."""
    cluster = yaml.safe_load(path.read_text())
    for parent in cluster.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            cluster = {**yaml.safe_load((path.parent / f"{parent}.yaml").read_text()), **cluster}
    if "gpu" not in cluster or "peak_tflops_bf16" not in cluster:
        pytest.skip(f"{path.stem} is measured, not a data sheet")
    peaks = gpu_peaks(cluster["gpu"])
    assert peaks is not None, f"{cluster['gpu']} is not in hardware.GPU_PEAK"
    for precision in ("bf16", "fp16", "fp32"):
        assert cluster[f"peak_tflops_{precision}"] * 1e12 == peaks[precision]
    assert {"H100", "A100"} <= set(GPU_PEAK)


@pytest.mark.parametrize(
    "precision, rates, warned",
    [
        ("bf16", {"bf16": 0.9e9, "fp32": 116e9}, True),  # an AVX2 CPU: generic bf16 kernels
        ("bf16", {"bf16": 900e9, "fp32": 350e9}, False),  # AVX512-BF16
        ("fp16", {"fp16": 40e9, "fp32": 116e9}, True),
    ],
)
def test_a_cpu_without_native_low_precision_says_so(monkeypatch, precision, rates, warned):
    rate_of = {hardware.PRECISION_DTYPES[p]: r for p, r in rates.items()}
    monkeypatch.setattr(hardware, "measured_matmul_peak", lambda dtype, **_: rate_of[dtype])
    line = hardware.slow_cpu_precision(precision)
    assert (line is not None) == warned
    if warned:
        assert line.startswith(f"warning: {precision} matmuls run at") and "parallel.precision=fp32" in line


def test_fp32_is_not_probed(monkeypatch):
    monkeypatch.setattr(hardware, "measured_matmul_peak", lambda *_a, **_k: pytest.fail("probed"))
    assert hardware.slow_cpu_precision("fp32") is None

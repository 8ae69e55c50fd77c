"""The E-step's cost model: seconds ≈ a · d · k · (n_train · niter · nredo + N) (README "Scale benchmark").

faiss trains on ``n_train = min(N, k · max_points_per_centroid)`` points for ``niter · nredo`` Lloyd
iterations and assigns all N points once; each is a flat L2 distance computation of ``k · d`` per point.
``run.py bench --parts estep-scale`` fits ``a`` on the machine it runs on.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CPU_SECONDS_PER_UNIT", "predict_cpu_seconds", "work_units"]

#: ``a`` fitted by ``run.py bench --parts estep-scale`` on a 2-core development machine (faiss-cpu, 2 threads,
#: shared with other work); a many-core node is faster roughly in proportion to its cores.
CPU_SECONDS_PER_UNIT = 1.4e-10


def work_units(n: int, k: int, niter: int, nredo: int, max_points_per_centroid: int, dim: int) -> float:
    """``d · k · (n_train · niter · nredo + N)``: distance terms of one k-means plus the final assignment."""
    n_train = min(int(n), int(k) * int(max_points_per_centroid))
    return float(dim) * int(k) * (n_train * int(niter) * int(nredo) + int(n))


def predict_cpu_seconds(n: int, ks: Sequence[int], niter: int, nredo: int, max_points_per_centroid: int, dim: int,
                        *, threads: int, seconds_per_unit: float = CPU_SECONDS_PER_UNIT,
                        reference_threads: int = 2) -> float:
    """Predicted faiss-cpu seconds of one E-step (every granularity), scaled linearly by thread count."""
    units = sum(work_units(n, k, niter, nredo, max_points_per_centroid, dim) for k in ks)
    return units * seconds_per_unit * reference_threads / max(1, int(threads))

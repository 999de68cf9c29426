"""Document packing as pure planning over document lengths (numpy, no tensors)."""

from .bfd import best_fit_decreasing, best_fit_decreasing_capped
from .config import Packer, PackingConfig, plan_packing, work_bucket_order
from .plan import PackingPlan, assemble_row

__all__ = [
    "PackingConfig",
    "PackingPlan",
    "Packer",
    "assemble_row",
    "best_fit_decreasing",
    "best_fit_decreasing_capped",
    "plan_packing",
    "work_bucket_order",
]

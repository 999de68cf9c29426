"""Where this process sits in a 2-D ("dp", "cp") device mesh, and rank checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cp_data.balancers.validation import is_int

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["MESH_DIM_NAMES", "dp_cp_coordinates", "check_rank"]

MESH_DIM_NAMES = ("dp", "cp")


def dp_cp_coordinates(mesh: "DeviceMesh") -> tuple[int, int, int, int]:
    """``(dp_rank, dp_world_size, cp_rank, cp_world_size)`` of this process in a 2-D ("dp", "cp") mesh."""
    names = mesh.mesh_dim_names
    if mesh.ndim != 2 or names is None or sorted(names) != sorted(MESH_DIM_NAMES):
        raise ValueError(f"expected a 2-D DeviceMesh with dims {MESH_DIM_NAMES}, got dims {names}")
    dp, cp = names.index("dp"), names.index("cp")
    return mesh.get_local_rank("dp"), mesh.size(dp), mesh.get_local_rank("cp"), mesh.size(cp)


def check_rank(name: str, rank: Any, world: Any) -> None:
    """Raise ``ValueError`` unless ``rank`` and ``world`` are ints with ``0 <= rank < world``."""
    for what, value in ((f"{name}_rank", rank), (f"{name}_world_size", world)):
        if not is_int(value):
            raise ValueError(f"{what} must be an int, got {value!r}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"{name}_rank must be in [0, {name}_world_size={world}), got {rank}")

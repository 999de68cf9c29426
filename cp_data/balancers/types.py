"""The balancer registry (a string enum) and the context-parallel style configs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from .base import RingAttentionLoadBalancer
from .llama3 import RingAttentionLlama3LoadBalancer
from .ulysses import UlyssesLoadBalancer
from .validation import ShardingError
from .zig_zag import RingAttentionZigZagLoadBalancer

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class RingAttentionLoadBalancerType(str, Enum):
    """The :class:`RingAttentionLoadBalancer` implementations, by name."""

    zig_zag = "zig_zag"
    """:class:`RingAttentionZigZagLoadBalancer`"""
    llama3 = "llama3"
    """:class:`RingAttentionLlama3LoadBalancer`"""
    ulysses = "ulysses"
    """:class:`UlyssesLoadBalancer`"""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: "RingAttentionLoadBalancerType | str") -> "RingAttentionLoadBalancerType":
        """The member for a member or its string value; ``ValueError`` listing the valid names."""
        try:
            return cls(value)
        except ValueError:
            raise ShardingError(
                f"unknown load balancer {value!r}; expected one of {[m.value for m in cls]}"
            ) from None

    @property
    def balancer_class(self) -> type[RingAttentionLoadBalancer]:
        """The class that implements this balancer."""
        return _CLASSES[self]

    def create(self, *, cp_rank: int, cp_world_size: int) -> RingAttentionLoadBalancer:
        """The balancer for an explicit rank and group size."""
        return self.balancer_class(cp_rank=cp_rank, cp_world_size=cp_world_size)

    def build(self, cp_mesh: "DeviceMesh") -> RingAttentionLoadBalancer:
        """The balancer for this process's rank in the (1-D) context-parallel mesh."""
        import torch.distributed as dist

        group = cp_mesh.get_group()
        return self.create(cp_rank=dist.get_rank(group), cp_world_size=dist.get_world_size(group))


_CLASSES: dict[RingAttentionLoadBalancerType, type[RingAttentionLoadBalancer]] = {
    RingAttentionLoadBalancerType.zig_zag: RingAttentionZigZagLoadBalancer,
    RingAttentionLoadBalancerType.llama3: RingAttentionLlama3LoadBalancer,
    RingAttentionLoadBalancerType.ulysses: UlyssesLoadBalancer,
}


METADATA_KEYS: dict[RingAttentionLoadBalancerType, tuple[str, ...]] = {
    RingAttentionLoadBalancerType.zig_zag: ("cu_doc_lens", "max_doc_len"),
    RingAttentionLoadBalancerType.llama3: (
        "cu_doc_lens_q",
        "cu_doc_lens_k",
        "max_doc_len_q",
        "max_doc_len_k",
        "local_k_slice",
    ),
    RingAttentionLoadBalancerType.ulysses: ("cu_doc_lens", "max_doc_len"),
}
"""The metadata keys of each balancer's ``batch_shard_by_document``, in kernel argument order."""


@dataclass
class RingContextParallelStyle:
    """Configuration for ring-attention context parallelism."""

    load_balancer: RingAttentionLoadBalancerType = RingAttentionLoadBalancerType.zig_zag
    """The load balancer to shard inputs with."""
    head_stride: int = 1
    """How many k/v heads each ring iteration processes; larger means fewer communication ops."""

    def __post_init__(self) -> None:
        self.load_balancer = RingAttentionLoadBalancerType.parse(self.load_balancer)
        if isinstance(self.head_stride, bool) or not isinstance(self.head_stride, int) or self.head_stride < 1:
            raise ShardingError(f"head_stride must be an int >= 1, got {self.head_stride!r}")

    def build(self, cp_mesh: "DeviceMesh") -> RingAttentionLoadBalancer:
        """The load balancer of this style for this process's rank in ``cp_mesh``."""
        return self.load_balancer.build(cp_mesh)


@dataclass
class UlyssesContextParallelStyle:
    """Configuration for Ulysses (all-to-all) context parallelism."""

    @property
    def load_balancer(self) -> RingAttentionLoadBalancerType:
        """Always :attr:`RingAttentionLoadBalancerType.ulysses`."""
        return RingAttentionLoadBalancerType.ulysses

    def build(self, cp_mesh: "DeviceMesh") -> RingAttentionLoadBalancer:
        """The Ulysses balancer for this process's rank in ``cp_mesh``."""
        return self.load_balancer.build(cp_mesh)

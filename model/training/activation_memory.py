"""What autograd keeps for the backward pass: the memory a training step's batch costs.

Counted on any device (a CPU too) with saved-tensor hooks, so the GPU memory of a training
preset can be derived from small runs here: activations are the same tensors on every device.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import Tensor, nn


class SavedTensorBytes:
    """Context manager: bytes of the distinct storages autograd saves while it is active,
    the module's parameters excluded (they live anyway). Tensors saved inside checkpointed
    regions are not counted: checkpointing frees them and recomputes them in the backward."""

    def __init__(self, module: nn.Module) -> None:
        self._parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    @property
    def total(self) -> int:
        return sum(self._storages.values())

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._parameters:
            self._storages[pointer] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._hooks.__exit__(kind, error, trace)


def _unpack(tensor: Tensor) -> Tensor:
    return tensor

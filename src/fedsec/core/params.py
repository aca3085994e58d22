"""Model state <-> flat vectors.

Robust rules and attacks work on one flat vector per hospital: the float entries of the
model's ``state_dict`` in order. Integer buffers (e.g. BatchNorm's ``num_batches_tracked``)
are not averaged; they keep the global model's value.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def flatten_state(state: dict[str, torch.Tensor], keys: list[str] | None = None) -> torch.Tensor:
    """state -> Tensor[d] (float32) over ``keys`` (default: the float entries, in order)."""
    keys = float_keys(state) if keys is None else keys
    return torch.cat([torch.as_tensor(state[k]).detach().reshape(-1).float() for k in keys])


def unflatten_state(vec: torch.Tensor, template: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Tensor[d] -> a state dict shaped like ``template``; non-float entries are copied from it."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    offset = 0
    for k, v in template.items():
        v = torch.as_tensor(v)
        if torch.is_floating_point(v):
            n = v.numel()
            out[k] = vec[offset:offset + n].reshape(v.shape).to(v.dtype).clone()
            offset += n
        else:
            out[k] = v.clone()
    if offset != vec.numel():
        raise ValueError(f"vector has {vec.numel()} values, the model's float state has {offset}")
    return out


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return flatten_state(model.state_dict())


def load_flat_params(model: torch.nn.Module, vec: torch.Tensor) -> None:
    model.load_state_dict(unflatten_state(vec, model.state_dict()))

"""Model state <-> flat vectors.

Robust rules and attacks work on one flat vector per hospital: the float entries of the
model's ``state_dict`` in order. Integer buffers (e.g. BatchNorm's ``num_batches_tracked``)
are not averaged; they keep the global model's value.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict

import numpy as np
import torch


def float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def flatten_state(state: dict[str, torch.Tensor], keys: list[str] | None = None) -> torch.Tensor:
    """state -> Tensor[d] (float32) over ``keys`` (default: the float entries, in order)."""
    keys = float_keys(state) if keys is None else keys
    return torch.cat([torch.as_tensor(state[k]).detach().reshape(-1).float() for k in keys])


def _flat_values(array) -> "np.ndarray":
    """The values of a Flower ``Array`` (or anything with ``.numpy()``) as a flat numpy array.

    A Flower Array holds an .npy file's bytes; ``Array.numpy()`` reads them into a new array
    that the caller then copies again. Here numpy's own .npy header reader gives the dtype
    and shape and the values are read in place from the bytes (one copy fewer); Fortran-
    ordered or object arrays take ``.numpy()``."""
    data, stype = getattr(array, "data", None), getattr(array, "stype", None)
    if isinstance(data, bytes) and stype == "numpy.ndarray":
        fp = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(fp)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fp)
        except ValueError:
            pass
        else:
            if not fortran and not dtype.hasobject:
                return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=fp.tell())
    return np.asarray(array.numpy()).reshape(-1)


def stack_flat(records, keys: list[str], d: int, minus: torch.Tensor | None = None) -> torch.Tensor:
    """Array records (one per hospital: name -> array, e.g. Flower ArrayRecords) -> Tensor[n, d]
    float32, row i the entries ``keys`` of record i flattened in order, minus ``minus``
    (Tensor[d]) when given.

    Written once into a preallocated matrix: no per-hospital state dict, no per-row
    concatenation and no second [n, d] for the subtraction (the server's unpacking of 50
    replies of 100k values used to take longer than FedAvg and Krum themselves). Raises
    ValueError naming the record and entry whose size does not fit."""
    out = torch.empty(len(records), d, dtype=torch.float32)
    view = out.numpy()  # shares memory with ``out``
    m = None if minus is None else minus.detach().to(torch.float32).cpu().numpy()
    for i, record in enumerate(records):
        offset = 0
        for k in keys:
            a = _flat_values(record[k])
            if offset + a.size > d:
                raise ValueError(f"record {i}: entry '{k}' overruns the model's {d} values")
            row = view[i, offset:offset + a.size]
            if m is not None and a.dtype == np.float32:  # one pass: read both, write the row
                np.subtract(a, m[offset:offset + a.size], out=row)
            else:
                row[...] = a  # numpy casts (e.g. float16 / float64 -> float32)
                if m is not None:
                    row -= m[offset:offset + a.size]
            offset += a.size
        if offset != d:
            raise ValueError(f"record {i}: {offset} values, the model has {d}")
    return out


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

"""Uses of a parameter that the rules treat as the parameter itself, by method name.

A cast (``.to``, ``.float()``) gives the same values; a transpose of a matrix parameter
(``.t()``, ``.T``) its transpose; a scaling (``P * c``, ``P / c``, ``-P``) c times it; a slice
(``split``, ``chunk``, ``narrow``, indexing: MHA's packed in-projection) a box of it. The
recording pass registers such an output as an alias of the parameter, and the terms of its
uses as terms of the parameter (transposed, scaled, or placed in its ``Region``). Uses in
``NO_GRADIENT`` create no gradient path at all. To teach the pass a new alias, add its name
to a table here.
"""

from __future__ import annotations

import math

from torch import Tensor

# Uses of a parameter that create no gradient path.
NO_GRADIENT = frozenset({
    "shape", "dtype", "device", "layout", "ndim", "requires_grad", "is_leaf", "is_cuda",
    "size", "dim", "numel", "nelement", "stride", "element_size", "is_contiguous",
    "is_floating_point", "is_complex", "data", "grad", "grad_fn", "names", "is_sparse",
    "detach", "detach_", "data_ptr", "untyped_storage", "storage_offset", "item", "tolist",
    "numpy", "__len__", "__repr__", "__format__", "__hash__", "__bool__", "eq", "ne", "lt",
    "le", "gt", "ge", "isnan", "isinf", "isfinite", "argmax", "argmin", "equal",
})
# Parameter -> a tensor with the same values: the same parameter to the rules.
CASTS = frozenset({"to", "float", "double", "half", "bfloat16", "type_as", "contiguous",
                   "clone", "type"})
TRANSPOSES = frozenset({"t", "T", "mT", "transpose", "permute", "swapaxes", "swapdims"})
# Parameter -> the parameter times a number.
SCALINGS = frozenset({"mul", "__mul__", "__rmul__", "div", "__truediv__"})
# Parameter -> views of boxes of it (MHA's split and chunk of its packed in-projection).
SLICES = frozenset({"split", "chunk", "narrow", "__getitem__", "tensor_split",
                    "split_with_sizes"})

Region = tuple[tuple[int, int], ...]  # [start, stop) on each axis of the parameter


def is_cast(name: str, rest: tuple, kwargs: dict) -> bool:
    """Whether ``P.name(*rest, **kwargs)`` is P's values in another dtype or layout."""
    return name in CASTS and not any(isinstance(v, Tensor) and v.requires_grad
                                     for v in (*rest, *kwargs.values()))


def is_transpose(name: str, rest: tuple, kwargs: dict) -> bool:
    """Whether ``P.name(*rest, **kwargs)`` of a matrix P is its transpose."""
    return name in TRANSPOSES and _swaps(name, rest, kwargs)


def factor(name: str, rest: tuple, kwargs: dict) -> float | None:
    """The number a parameter is multiplied by in ``P * c``, ``P / c`` or ``-P``, or None."""
    if name == "neg" and not rest and not kwargs:
        return -1.0
    if name not in SCALINGS or len(rest) != 1 or kwargs:
        return None
    c = rest[0]
    if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c):
        return None
    if name in ("div", "__truediv__"):
        return 1.0 / c if c else None
    return float(c)


def _swaps(name: str, dims: tuple, kwargs: dict) -> bool:
    """Whether a transpose-like call on a matrix swaps its two axes."""
    if name in ("t", "T", "mT"):
        return True
    dims = (*dims, *kwargs.values())
    if name == "permute":
        order = dims[0] if len(dims) == 1 else dims
        return [d % 2 for d in order] == [1, 0]
    return len(dims) == 2 and dims[0] % 2 != dims[1] % 2


def box(part: Tensor, source: Tensor) -> Region | None:
    """The box of ``source`` that the view ``part`` is, read from their geometry, or None."""
    if (not isinstance(part, Tensor) or part.dim() != source.dim()
            or part.stride() != source.stride()
            or part.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()):
        return None
    rest = part.storage_offset() - source.storage_offset()
    starts = [0] * source.dim()
    for axis in sorted((a for a in range(source.dim()) if source.shape[a] > 1),
                       key=lambda a: -source.stride(a)):
        starts[axis], rest = divmod(rest, source.stride(axis))
    if rest or any(s < 0 or s + size > full for s, size, full in
                   zip(starts, part.shape, source.shape, strict=True)):
        return None
    return tuple((s, s + size) for s, size in zip(starts, part.shape, strict=True))


def compose(outer: Region | None, inner: Region) -> Region:
    """A box ``inner`` of a box ``outer`` of the parameter, in the parameter's coordinates."""
    if outer is None:
        return inner
    return tuple((a + s, a + t) for (a, _), (s, t) in zip(outer, inner, strict=True))

"""The one choice between a Triton kernel and its plain-torch twin: by the device of the first argument.

Every public kernel entry point is a :class:`Dispatch` of two functions with the same signature, the
Triton implementation (``*_triton``) and the vectorized torch twin (``*_ref``). A call runs the Triton one
when its first argument is a CUDA tensor and the torch twin otherwise; the entry point shows the twin's
signature.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Dispatch:
    """A kernel entry point: ``triton`` on CUDA tensors, ``torch`` elsewhere, chosen at each call.

    Parameters
    ----------
    triton
        The Triton implementation.
    torch
        Its plain-torch twin, taking the same arguments and returning the same outputs (the Triton side may
        add keyword-only tuning options, such as ``split_size``, that the twin does not take); its name
        ends in ``_ref``, which the entry point's name drops.
    summary
        The entry point's one-line description; its docstring adds the dispatch rule and points to the
        twin for the arguments and outputs.

    Notes
    -----
    Both are looked up on the instance at call time, so a test may replace either one.
    """

    triton: Callable[..., Any]
    torch: Callable[..., Any]
    summary: str

    def __post_init__(self) -> None:
        functools.update_wrapper(self, self.torch)  # the twin's signature (``__wrapped__``) and module
        self.__name__ = self.__qualname__ = self.torch.__name__.removesuffix("_ref")
        self.__doc__ = (f"{self.summary} Triton on CUDA tensors, vectorized torch otherwise.\n\n"
                        f"See :func:`{self.torch.__name__}` for the arguments and outputs.")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``triton`` if the first argument is a CUDA tensor, else ``torch``."""
        impl = self.triton if args[0].is_cuda else self.torch
        return impl(*args, **kwargs)

"""Forward hooks that read or replace a module's output, whatever shape the output has.

Decoder layers in transformers 5 return a tensor, older ones a tuple whose first element is the
hidden state; both go through here so callers only see the hidden-state tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

HiddenFn = Callable[[torch.Tensor], torch.Tensor | None]


def hidden_of(output: object) -> torch.Tensor:
    """The hidden-state tensor inside a module output (tensor, tuple or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in module output of type {type(output).__name__}")


def _replace_hidden(output: object, new: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:])  # type: ignore[index]


def register_output_hook(module: nn.Module, fn: HiddenFn) -> RemovableHandle:
    """Call ``fn(hidden)`` on every forward of ``module``; a returned tensor replaces the hidden state."""

    def hook(_mod: nn.Module, _inputs: object, output: object) -> object | None:
        new = fn(hidden_of(output))
        return None if new is None else _replace_hidden(output, new)

    return module.register_forward_hook(hook)

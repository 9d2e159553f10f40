"""Prompt layouts that the sampling layer uses but does not own, by name.
A fine-tuned model's instruction layout is the SFT layer's (sft/format.py
registers it as "sft" on import, and loading an SFT model dir imports it
through the task modules), so sampling never imports sft (ARCHITECTURE.md)."""
from typing import Callable, Dict

_LAYOUTS: Dict[str, Callable] = {}


def register_layout(name: str, layout: Callable) -> None:
    """`layout(instruction ids, input ids, output ids)` -> (tokens, ...)."""
    _LAYOUTS[name] = layout


def layout(name: str) -> Callable:
    if name not in _LAYOUTS:
        raise ValueError(f"no prompt layout {name!r} is registered (registered: {sorted(_LAYOUTS)}); the "
                         "module that defines it registers it when imported (sft/format.py: 'sft')")
    return _LAYOUTS[name]

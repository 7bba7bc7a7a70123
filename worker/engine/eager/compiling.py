"""`torch.compile` of the model's own forward pass, for the eager path (the static path compiles
its decode step itself): compiled at start-up, and undone when it fails, then or at run time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from worker.engine.config import describe

logger = logging.getLogger(__name__)


def compile_forward(
    model: Any, device: torch.device, backend: str | Callable[..., Any]
) -> str | None:
    """Compile `model.forward` and run it once; None, or why it runs eagerly instead."""
    eager = model.forward
    try:
        model.forward = torch.compile(eager, dynamic=True, backend=backend)
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 4), dtype=torch.long, device=device))
    except Exception as e:  # compilation fails in many ways (no compiler, unsupported op, ...)
        uncompile(model)
        return f"torch.compile failed at start-up, running eagerly: {describe(e)}"
    return None


def uncompile(model: Any) -> None:
    """The model's forward pass as it was before `compile_forward`."""
    vars(model).pop("forward", None)

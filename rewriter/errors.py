"""Exception types of the toolkit: one per kind of failure, each naming what went wrong."""

from __future__ import annotations

__all__ = [
    "RewriterError",
    "InputError",
    "CaptureError",
    "NoFFNError",
    "PassError",
]


class RewriterError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class InputError(RewriterError, ValueError):
    """The model or the example inputs given to us are unusable (wrong type, shape or dtype)."""


class CaptureError(RewriterError, RuntimeError):
    """Neither torch.export nor torch.fx could turn the model into one graph."""


class NoFFNError(RewriterError, LookupError):
    """A rewrite needs feed-forward blocks and the graph has none."""


class PassError(RewriterError, RuntimeError):
    """A graph pass raised, broke the graph's lint, or changed the model's numerics.

    ``pass_name`` names the pass; ``stage`` is one of "run", "lint", "numerics", "contract".
    """

    def __init__(self, pass_name: str, stage: str, message: str):
        super().__init__(f"pass {pass_name!r} failed ({stage}): {message}")
        self.pass_name = pass_name
        self.stage = stage

"""Exception types of the toolkit: one per kind of failure, each naming what went wrong.

Every error the toolkit raises on purpose derives from :class:`RewriterError` and from the
standard base class a caller would expect (``ValueError`` for bad input, ``ImportError`` for
a missing dependency, ...). ``exit_code`` is what the CLI exits with: 2 for the user's input or
environment (fix the command), 1 for a failure inside the toolkit.
"""

from __future__ import annotations

__all__ = [
    "RewriterError",
    "InputError",
    "CaptureError",
    "NoFFNError",
    "PassError",
    "UnknownModelError",
    "MissingDependencyError",
    "ExportInputError",
    "OnnxExportError",
    "OnnxRuntimeError",
    "CheckpointError",
    "FP8InferenceModeError",
    "exit_code",
]


class RewriterError(Exception):
    """Base class of every error the toolkit raises on purpose."""

    exit_code = 1


class InputError(RewriterError, ValueError):
    """The model or the example inputs given to us are unusable (wrong type, shape or dtype)."""

    exit_code = 2


class FP8InferenceModeError(InputError, RuntimeError):
    """What an inference-mode FP8 model cannot do: a backward pass (its weights are stored FP8
    once, with no autograd formula), or a write to the dequantized copy its ``weight`` hands
    out. The message names the operation and the way to do it (``FP8Config(mode="training")``,
    ``load_state_dict``, re-converting). Also a ``RuntimeError``, what torch raised before."""


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


class UnknownModelError(InputError, KeyError):
    """An unknown model name; ``except KeyError`` and ``except ValueError`` both catch it."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(RewriterError, ImportError):
    """An optional dependency is not installed; the message says what to install."""

    exit_code = 2


class ExportInputError(InputError):
    """An argument of ``export_onnx`` is unusable (raised before anything is written)."""


class OnnxExportError(RewriterError, RuntimeError):
    """The model could not be exported. ``stage`` is one of "run", "capture", "translate",
    "optimize", "check", "save"; ``node`` and ``op`` name the graph node that failed, when
    known."""

    def __init__(self, stage: str, message: str, *, node: str | None = None,
                 op: str | None = None):
        where = f" at node {node!r} (op {op})" if node else (f" (op {op})" if op else "")
        super().__init__(f"ONNX export failed during {stage}{where}: {message}")
        self.stage, self.node, self.op = stage, node, op


class OnnxRuntimeError(RewriterError, RuntimeError):
    """onnxruntime is missing, installed twice, or cannot run the model."""

    exit_code = 2


class CheckpointError(RewriterError, ValueError):
    """A checkpoint cannot be written (the model is not representable in the format: the
    message names the reason and the config change that would make it representable) or read
    (missing, tampered or foreign files: the message names the file and the field)."""

    exit_code = 2


def exit_code(exc: BaseException) -> int:
    """The CLI's exit status for ``exc``: a :class:`RewriterError` says it (``exit_code``);
    the standard input errors a config's validation raises (``ValueError`` naming the field,
    ``LookupError``) and the environment's ``OSError`` (a path that cannot be written) are 2;
    anything else is 1, a failure inside the toolkit."""
    if isinstance(exc, RewriterError):
        return exc.exit_code
    return 2 if isinstance(exc, (ValueError, LookupError, OSError)) else 1

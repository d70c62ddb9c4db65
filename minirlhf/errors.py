"""Turning library errors into the one line a user reads (`minirlhf: error: ...`)."""

from __future__ import annotations


class SetupError(RuntimeError):
    """The machine cannot do what was asked (no CUDA in this PyTorch build, a full disk, a judge endpoint that
    is down): not the user's input. The CLI reports it in one line and exits 3."""


def one_line(error: BaseException, limit: int = 500) -> str:
    """The error's message on one line: a library message that spans lines (e.g. torch's list of size
    mismatches) is joined and cut to `limit` characters, so stderr stays one line a user can read."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def blocked_pickle_reason(error: BaseException) -> str:
    """The one line of torch's weights-only refusal that says what was blocked (e.g. `Trying to load unsupported
    GLOBAL posix.system ...`), without its advice to retry with weights_only=False."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    blocked = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
    return (blocked or lines or [type(error).__name__])[0]

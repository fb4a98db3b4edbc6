"""Errors lowbit raises, split by who can fix them.

``UserError`` is something the person running lowbit caused and can fix (a bad file, an unknown
pass, a mistyped option). Its message is one sentence naming the file, node or option; the CLI
prints it and exits with status 2, writing nothing. Every other exception is a bug in lowbit; the
pass manager wraps those raised inside a pass in ``PassFailure`` so the message names the pass.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in lowbit's input: one clear sentence, exit status 2, nothing written."""

    exit_code = 2


class PassFailure(RuntimeError):
    """A pass crashed or broke the model; carries the pass name and the passes run before it."""

    exit_code = 1

    def __init__(self, pass_name: str, message: str, history: tuple[str, ...] = ()):
        self.pass_name = pass_name
        self.history = history
        after = f" (after {', '.join(history)})" if history else ""
        super().__init__(f"pass {pass_name}{after}: {message}")


class VerificationError(PassFailure):
    """An exact pass changed the model's outputs beyond its tolerance.

    That is a bug in the pass (exit 1), whatever model triggered it; the message names the pass,
    the output that moved most, and the error measured.
    """


def did_you_mean(word: str, choices) -> str:
    """`` ; did you mean 'x'?`` for the closest choice, or an empty string."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""

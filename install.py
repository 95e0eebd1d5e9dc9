"""Run by the webui on every launch (in a subprocess). memslice needs nothing the webui does not ship.

It must stay fast and must never install torch, gradio or pydantic: it only checks, and says what is off.
"""

from __future__ import annotations

import importlib.util


def check() -> list[str]:
    """Problems a user should hear about at startup (an empty list when all is well)."""
    problems = []
    if importlib.util.find_spec("torch") is None:
        problems.append("torch is not importable; the webui should have installed it")
    return problems


if __name__ == "__main__":
    for problem in check():
        print(f"memslice: {problem}")

"""Adds ``--opt-memslice``: makes 'Automatic' in Cross attention optimization pick memslice-auto."""

from __future__ import annotations

import argparse


def preload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--opt-memslice",
        action="store_true",
        help="memslice: use the memory-aware attention planner when Cross attention optimization is Automatic",
    )

"""Fake of modules/devices.py: the autocast helpers memslice uses, with a call log for tests."""

from __future__ import annotations

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float16
dtype_vae = torch.float16
without_autocast_calls: list[bool] = []


def without_autocast(disable=False):
    without_autocast_calls.append(disable)
    return (
        torch.autocast("cuda", enabled=False)
        if torch.is_autocast_enabled() and not disable
        else contextlib.nullcontext()
    )

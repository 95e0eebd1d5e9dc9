"""What every room of the webui glue shares: the Host the forwards run with, the stats, the active entry.

The only modules that import the webui (``modules``) are this package's; everything else in lib_memslice runs
without it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from modules import shared  # type: ignore[import-not-found]

from .. import probe
from ..limits import NotEnoughMemory
from ..settings import Settings, read_options
from ..stats import Stats

# Records go through the webui's own logging configuration (it sets the root level from --loglevel or
# SD_WEBUI_LOG_LEVEL); memslice only asks for INFO on its own logger so the one-line job summary is not dropped
# by Python's default WARNING threshold, and adds no handler of its own.
log = logging.getLogger("memslice")
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)

STATS = Stats()


class WebuiHost:
    """The Host the forwards use inside the webui: options, hypernetworks, upcast and autocast from ``modules``."""

    def __init__(self) -> None:
        #: an attention call's record, noted into :data:`STATS` (folded in by its next read: the job's infotext, the
        #: status API, the job's end); a bound ``list.append``, no Python call between two attention calls
        self.record = STATS.note
        self._hypernetwork: Any = None

    def settings(self) -> Settings:
        """The options, read on every attention call (:func:`lib_memslice.settings.read_options`)."""
        return read_options(getattr(shared, "opts", None))

    def apply_hypernetworks(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hypernetwork = self._hypernetwork
        if hypernetwork is None:  # imported once: a ``from package import module`` runs a Python call each time
            from modules.hypernetworks import hypernetwork  # type: ignore[import-not-found]

            self._hypernetwork = hypernetwork
        return hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)

    def upcast(self) -> bool:
        return bool(getattr(shared.opts, "upcast_attn", False))

    def without_autocast(self) -> Any:
        from modules import devices  # type: ignore[import-not-found]

        return devices.without_autocast()

    def record_failure(self, error: NotEnoughMemory) -> None:
        STATS.record_failure()

    def record_bands(self, record: Any) -> None:
        """A VAE pass's :class:`lib_memslice.bands.BandRecord` (its band count for the infotext and the line)."""
        STATS.record_bands(record)

    def bands_active(self) -> bool:
        """The banded VAE forwards act only while a memslice entry is applied."""
        try:
            return active_entry() is not None
        except Exception:
            return False


HOST = WebuiHost()


def device_kind() -> str:
    try:
        return probe.device_kind(shared.device)
    except Exception:
        return "unknown"


def active_entry() -> Any | None:
    """The memslice entry the webui applied last, if any (``sd_hijack.current_optimizer``)."""
    from modules import sd_hijack  # type: ignore[import-not-found]

    current = getattr(sd_hijack, "current_optimizer", None)
    return current if getattr(current, "is_memslice", False) else None


def device() -> torch.device:
    found = getattr(shared, "device", None)
    return found if isinstance(found, torch.device) else torch.device("cpu")

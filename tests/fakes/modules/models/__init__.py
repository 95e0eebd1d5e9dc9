"""Fake of the webui's ``modules.models`` package (1.10.1): only ``sd3``."""

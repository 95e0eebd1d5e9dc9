"""Fake of the webui 1.10.1's ``modules.models.sd3``: the MMDiT's and the SD3 VAE's calling conventions."""

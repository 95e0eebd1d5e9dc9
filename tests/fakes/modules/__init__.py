"""Fake of the webui's ``modules`` package (1.10.1), for tests only."""

"""Fake of the parts of Stability-AI generative-models (sgm) the webui patches, for tests only."""

"""carousel: serving stateful recurrent language models."""
__version__ = "0.1.0"

"""``dfq``: one module per subcommand family, each registering its own parser; ``common`` holds the
settings, checks and model loading they share. Every flag can also come from a TOML recipe."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]

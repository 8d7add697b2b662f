"""caitool: Constitutional AI as composable JSONL command-line phases."""

__version__ = "0.1.0"

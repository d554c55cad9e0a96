"""The pytest-benchmark suite (README.md here: method and how to run); run from the repository root."""

"""Command-line tools (``python -m custom.tools.<name>``), apart from the components the configs use."""

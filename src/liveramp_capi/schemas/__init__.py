"""The JSON Schema of an input record, shipped as package data (read with ``importlib.resources``)."""

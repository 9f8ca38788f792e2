"""The bundled toy world: procedural videos, a toy text encoder and the bundled models."""

"""Converters from published checkpoint layouts into the native format (and back)."""

from zoo.conversion.base import Format, convert, detect_format, export, formats

__all__ = ["Format", "convert", "detect_format", "export", "formats"]

"""The shapes reference benchmark: procedural 16x16 RGB images of coloured shapes, unconditional
(docs/shapes.md)."""

from .data import make_shapes, shapes_image

__all__ = ["make_shapes", "shapes_image"]

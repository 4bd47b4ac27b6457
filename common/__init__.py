"""Leaf modules every part of the project may import (they import only torch and the standard library): the
errors a user can cause, and the collectives a method needs across processes."""

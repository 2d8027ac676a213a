"""jaxq's version, in a module of its own so that any module (the checkpoint
writer records it) reads it without importing the package."""

__version__ = "0.1.0"

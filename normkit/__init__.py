"""normkit: the library behind the book "What can replace BatchNorm?"."""
__version__ = "0.1.0"

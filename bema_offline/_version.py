"""The package version, in a leaf module that any module may import without importing the package's face."""

__version__ = "0.1.0"

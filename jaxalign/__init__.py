"""jaxalign: a JAX-native trainer for aligning language models with preferences."""

__version__ = "0.1.0"

"""spartan-serve: SPARTAN task memories served over one frozen Transformer encoder."""

__version__ = "0.1.0"

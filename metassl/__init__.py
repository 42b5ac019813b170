"""metassl: self-supervised meta-learning on Ray."""
__version__ = "0.1.0"

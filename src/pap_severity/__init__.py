"""pap-severity: an explainable severity classifier for Herlev Pap smear cells."""

__version__ = "0.1.0"

"""memctl: find what a language model memorized verbatim, then suppress or amplify it."""

__version__ = "0.1.0"

"""valley-rt: a fast, faithful inference runtime for the Valley video LLM."""

__version__ = "0.1.0"

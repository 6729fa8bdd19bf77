"""esamp_pl: Exploratory Sampling (ESamp) for Hugging Face causal LMs, with pre-trained Distillers."""

__version__ = "0.1.0"

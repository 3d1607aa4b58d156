"""Quality of a model: Wikitext-2 perplexity and zero-shot accuracy (lm-eval)."""

"""Evaluation: recall of told facts, perplexity."""

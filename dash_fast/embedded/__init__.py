"""The embedded default: a tiny character-level model and arithmetic task, and its supervised warm-up."""

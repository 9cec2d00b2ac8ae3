"""Prompt data: rows, datasets and samplers, and the named dataset formats (gsm8k, math, mbpp, ...)."""

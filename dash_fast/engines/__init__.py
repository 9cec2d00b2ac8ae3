"""Rollout engines: the sampler protocol (base.py), the embedded torch engine, vLLM in-process and in a process."""

"""Rewards: built-in math / format / code rewards, the code sandbox, reward models, the calling convention."""

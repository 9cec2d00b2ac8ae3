"""The TRL drop-in: GRPOConfig / GRPOTrainer and the pieces only the TRL API needs (eval, logs, data, masks)."""

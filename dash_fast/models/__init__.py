"""Model-side code shared by sampling and training: the shared-prompt forward and PEFT (LoRA) support."""

"""The GRPO trainer: TRL's GRPOTrainer with the toolkit's extensions (trainer.py owns the class and the
list of TRL methods it overrides)."""

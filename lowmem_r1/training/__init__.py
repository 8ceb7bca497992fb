"""Training: a recipe's run (run.py), its stages (stages.py: grpo, sft), the GRPO trainer and its
extensions (grpo/), and several processes (launch.py)."""

"""One module per training technique; each builds its TRL trainer from the recipe's sections
(sft.py: SFT and continued pretraining; dpo.py: preference pairs)."""

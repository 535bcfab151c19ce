"""Training: one harness (harness.py) and a recipe per method (recipes/, chosen by the registry in methods.py)."""

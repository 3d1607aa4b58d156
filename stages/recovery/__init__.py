"""Winning back quality after pruning: EBFT block by block, the LoRA baseline, and the
registry of recoveries that tables, plots and the CLI name."""

"""The paper's tables and plots, built from stored run reports only."""

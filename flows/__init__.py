"""Thin Prefect flows over the stages, and the `ebft` command line."""

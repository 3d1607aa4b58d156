"""Pipeline stages as plain functions: callable and testable without Prefect."""

"""Prefect 3 flows: thin wrappers that order `ae_core` stages as tasks."""

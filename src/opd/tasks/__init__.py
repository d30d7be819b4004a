"""Verifiable tasks: prompts, reference solutions, answer extraction, exact verifiers."""

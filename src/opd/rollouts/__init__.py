"""Rollouts: whose tokens the loss is computed on."""

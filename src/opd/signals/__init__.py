"""Per-method shaping of scores into advantages, weights and masks (pure torch; no models,
no config, no env), plus run monitors shared by diagnostics."""

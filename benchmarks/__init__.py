"""Benchmarks of sstoken-trl: step cost against plain SFT, and selection quality on a noisy SFT task."""

"""Scoring stage: batch layout, the attention score, and the hook that computes it inside the training forward."""

"""Tools around training: sstoken-train (CLI, recipe arguments, loading), the offline demo, sstoken-inspect."""

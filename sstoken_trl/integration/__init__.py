"""The trainer integration: the callback and the selective forward it installs."""

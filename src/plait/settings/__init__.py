"""Config files: TOML into typed dataclasses, overrides, and the sections every plane shares."""

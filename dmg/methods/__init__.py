"""Training methods: aggregate and multi-head baselines, and DMG. Each is one class plus one YAML."""

"""One file per PEFT method; each registers its config and `apply()` with `register_method`."""

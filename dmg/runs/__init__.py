"""One run's life: the experiment builder (the only code that sees the whole config), settings checks, MLflow
tracking, stores and the run's summary."""

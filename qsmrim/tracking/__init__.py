"""MLflow tracking (parent/child runs of a grid) and the model registry. Platform layer: imports mlflow."""

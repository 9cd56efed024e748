"""Pipeline stages: thin functions that take a resolved config, call the library, log to MLflow and
write outputs. :mod:`pipelines.runner` orders them and skips the unchanged ones."""

"""The one flat, typed config of a run: :mod:`~opd.config.loader` reads YAML files and
``key=value`` overrides into a pydantic model; :mod:`~opd.config.train` declares the run's
fields and learns each method's knobs from the method registry."""

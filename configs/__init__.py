"""The run configs, shipped inside the package: installed as `normistral_configs` (see setup.py), read by
`jaxmodel.run_config.find_config`, which also accepts their bare names (`tiny-cpu`, `demo`, ...)."""

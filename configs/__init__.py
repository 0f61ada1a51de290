"""The experiment configs, installed with the package as `ap_jax.configs` (setup.cfg maps this folder onto it), so
a bare name (`--config tiny:autoencoder,runlocal`) finds them from any working directory in a wheel install too.
`ap_jax.train.config_utils.load_config` loads each file by its path; nothing here is imported by name."""

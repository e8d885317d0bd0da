"""The LDM single-file key mapping, for tests: it lives in `multifusion.weights.ldm` (the
library writes single-file merges with it); re-exported here for the test kit."""

from multifusion.weights.ldm import rename, save_as_single_file, to_ldm_state_dict, unet_prefixes, vae_prefixes

__all__ = ["rename", "save_as_single_file", "to_ldm_state_dict", "unet_prefixes", "vae_prefixes"]

"""The LDM single-file key mapping, for tests: it lives in `multifusion.families.ldm` (the
writer in `multifusion.weights.export`)."""

from multifusion.families.ldm import rename, to_ldm_state_dict, unet_prefixes, vae_prefixes
from multifusion.weights.export import save_as_single_file

__all__ = ["rename", "save_as_single_file", "to_ldm_state_dict", "unet_prefixes", "vae_prefixes"]

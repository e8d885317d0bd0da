"""Where models meet inside the UNet forward: AFA's aggregators and the feature ensemble."""

"""Where models meet after each scheduler step: trajectory combiners (AMDM)."""

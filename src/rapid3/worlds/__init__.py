"""The one seam between the embedded world and a diffusers pipeline (being built: issue 17)."""

"""Input and output: STAR and MRC files, particle metadata and images, atomic writes, validation."""

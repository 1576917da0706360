"""Which pipeline a worker serves: the catalog's models and their lock files, loading each with its own
diffusers class once per process, the tiny fixtures, the CUDA serving plan (batch budget, compiled
shapes), and the safety checker's weights."""

"""Which pipeline a worker serves: pinned presets, loading once per process, the tiny fixture, the
CUDA serving plan (batch budget, compiled shapes), and the safety checker's weights."""

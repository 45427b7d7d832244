"""llmstack: one YAML recipe from data curation to a guarded OpenAI-compatible endpoint."""

__version__ = "0.1.0"

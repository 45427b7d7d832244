"""Recipe schemas: the recipe and every block of it, torch-free (`llmstack validate` imports only this package)."""

"""`llmstack sweep`: a hyperparameter search over a recipe's own fields with Optuna, each trial a real recipe run.

    trial.py     one trial: the sampled values set at their YAML paths, the recipe re-validated and run, its score
    study.py     the study: storage, resume after a kill, the shared base run, the ask/tell loop (here or on Ray)
    outputs.py   what a finished sweep leaves: trials.jsonl, best_recipe.yaml, importances.json, a plot, sweep.md
"""

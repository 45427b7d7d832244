"""Environments shipped for agent grpo stages (`environment: llmstack.eval.environments.calculator:Calculator`),
each a class in TRL's environment contract: `reset(**row)` before an episode, public methods the model calls as tools,
and each with held-out problems (`problems("held_out")`) that training must not see. They live in the eval layer so
that an agent eval can score the same environments (training imports evaluation; evaluation cannot import training).
"""

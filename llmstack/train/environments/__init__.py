"""Environments shipped for agent grpo stages (`environment: llmstack.train.environments.calculator:Calculator`),
each a class in TRL's environment contract: `reset(**row)` before an episode, public methods the model calls as tools,
and for each a set of held-out problems (`held_out()`) that training rows must not contain and the agent eval scores.
"""

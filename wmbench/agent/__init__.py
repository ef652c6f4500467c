"""The Drama agent: actor-critic in imagination, replay with DFS, acting and evaluation, the training
loop of `wmbench atari`, its checkpoints and run records."""
from wmbench.agent.actor_critic import ActorCritic, Agent, ReturnNormalizer, RunningNorm, lambda_return

__all__ = ["ActorCritic", "Agent", "ReturnNormalizer", "RunningNorm", "lambda_return"]

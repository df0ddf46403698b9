"""Serving: the continuous-batching engine (engine: queue and worker; slots: the batch K/V rows),
and the lockstep that mirrors calls to tensor-parallel followers (lockstep, mirror). The sampling
step is models.generate.SamplingState, shared with generate_tokens."""

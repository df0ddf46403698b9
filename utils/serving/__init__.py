"""Serving: the continuous-batching engine and the lockstep that mirrors calls to tensor-parallel followers."""

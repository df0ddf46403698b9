"""Which checkpoint serves which mode of the composite demo, from flags or environment
variables (no hard-coded GPUs: each model goes on --device, default cuda when present):

  streamlit run composite_demo/main.py -- --cogvlm PATH --cogagent PATH [--grounding PATH]
  COGVLM_MODEL=PATH COGAGENT_MODEL=PATH streamlit run composite_demo/main.py

Any one model given serves every mode that has none of its own. Each distinct checkpoint is
loaded once per server process (st.cache_resource) and shared by all sessions.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

from utils.apps.args import add_loading_args
from utils.apps.flags import ArgumentParser

MODES = ("CogVLM chat", "CogAgent chat", "CogAgent agent")
# Loading flags whose default an environment variable may set (composite_demo/README.md;
# COGVLM_DTYPE is read by --dtype itself).
ENV_DEFAULTS = {"device": "COGVLM_DEVICE", "quant": "COGVLM_QUANT", "quant_group": "COGVLM_QUANT_GROUP",
                "local_tokenizer": "COGVLM_TOKENIZER"}


class Registry(argparse.Namespace):
    """The parsed flags: the checkpoint of each mode (cogvlm, cogagent, grounding: e.g.
    cogvlm-grounding-generalist, default cogvlm's) and the loading flags every app takes
    (utils/apps/args.py add_loading_args), which options_from_args turns into LoadOptions."""

    def model_for(self, mode: str, grounding: bool = False) -> Optional[str]:
        any_model = self.cogvlm or self.cogagent or self.grounding
        if mode == "CogVLM chat":
            return (self.grounding if grounding else None) or self.cogvlm or any_model
        return self.cogagent or any_model


def parse(argv: list[str]) -> Registry:
    p = ArgumentParser(prog="composite_demo/main.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cogvlm", default=os.environ.get("COGVLM_MODEL"))
    p.add_argument("--cogagent", default=os.environ.get("COGAGENT_MODEL"))
    p.add_argument("--grounding", default=os.environ.get("COGVLM_GROUNDING_MODEL"))
    add_loading_args(p, single_stream=True)            # each session streams its own answer
    p.set_defaults(**{dest: os.environ[var] for dest, var in ENV_DEFAULTS.items() if os.environ.get(var)})
    a, unknown = p.parse_known_args(argv, namespace=Registry())
    if unknown:                                 # a typo must not be ignored silently
        raise ValueError(f"unknown argument(s) after `--`: {' '.join(unknown)} (the flags: "
                         f"`streamlit run composite_demo/main.py -- --help`)")
    return a

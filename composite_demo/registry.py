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
from dataclasses import dataclass
from typing import Optional

from models.quantize import GROUPS
from utils.apps.flags import ArgumentParser

MODES = ("CogVLM chat", "CogAgent chat", "CogAgent agent")


@dataclass
class Registry:
    cogvlm: Optional[str] = None
    cogagent: Optional[str] = None
    grounding: Optional[str] = None        # e.g. cogvlm-grounding-generalist; default: cogvlm's
    device: Optional[str] = None
    quant: Optional[int] = None
    quant_group: Optional[int] = None      # inputs per int4 scale (default 64; 128 saves memory)
    bf16: bool = False
    fp16: bool = False
    local_tokenizer: Optional[str] = None
    dtype: str = "auto"
    compile: bool = False

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
    p.add_argument("--device", default=os.environ.get("COGVLM_DEVICE"))
    p.add_argument("--quant", type=int, choices=[4, 8], default=int(os.environ["COGVLM_QUANT"])
                   if os.environ.get("COGVLM_QUANT") else None)
    p.add_argument("--quant_group", type=int, choices=GROUPS, default=int(os.environ["COGVLM_QUANT_GROUP"])
                   if os.environ.get("COGVLM_QUANT_GROUP") else None)
    p.add_argument("--dtype", default=os.environ.get("COGVLM_DTYPE", "auto"),
                   choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--local_tokenizer", default=os.environ.get("COGVLM_TOKENIZER"))
    p.add_argument("--compile", action="store_true", help="CPU: inductor-compiled decode step (see the README)")
    a, unknown = p.parse_known_args(argv)
    if unknown:                                 # a typo must not be ignored silently
        raise ValueError(f"unknown argument(s) after `--`: {' '.join(unknown)} "
                         f"(known: --cogvlm --cogagent --grounding --device --quant --quant_group --dtype --bf16 --fp16 --local_tokenizer --compile)")
    return Registry(**vars(a))
